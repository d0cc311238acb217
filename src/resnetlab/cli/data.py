"""``resnetlab data [SOURCE]``: load a dataset as training would (building its cache) and describe it."""

from __future__ import annotations

import argparse
import time

from resnetlab.cli.common import add_json_flag, non_negative_float, positive_int, print_json, seed_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", description=data.__doc__)
    p.add_argument("source", nargs="?", default=None,
                   help="digits (default), cifar10, cifar100, an ImageFolder directory or archive, "
                        "or a cifar-10-batches-py folder")  # fmt: skip
    p.add_argument("--image-size", type=positive_int, help="input side (default: the images' own, 224 for photos)")
    p.add_argument(
        "--val-split", type=non_negative_float, default=0, help="hold out this fraction (<1) or count of train"
    )
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the held-out split")
    p.add_argument("--download", action="store_true", help="download cifar10/cifar100 if missing")
    p.add_argument("--no-cache", action="store_true", help="decode per item instead of the uint8 cache")
    add_json_flag(p)
    p.set_defaults(func=data)


def data(args: argparse.Namespace) -> int:
    """Build the dataset with ``build_data`` and print its splits, classes, normalisation and load time."""
    from resnetlab.data import build_data

    start = time.perf_counter()
    val_split = int(args.val_split) if args.val_split >= 1 else args.val_split
    bundle = build_data(args.source, image_size=args.image_size, val_split=val_split, seed=args.seed,
                        download=args.download, cache=False if args.no_cache else None)  # fmt: skip
    summary = {**bundle.summary(), "load_seconds": round(time.perf_counter() - start, 3)}
    if args.json:
        print_json(summary)
        return 0
    splits = ", ".join(f"{name} {size}" for name, size in summary["splits"].items())
    print(f"{bundle.name}: {splits} images; {bundle.num_classes} classes; {bundle.in_chans}x{bundle.image_size}px")
    print(f"  classes    {', '.join(bundle.classes[:12])}{' ...' if bundle.num_classes > 12 else ''}")
    print(f"  normalise  mean {bundle.mean}, std {bundle.std}; train recipe '{bundle.augment}'")
    print(f"  storage    {type(bundle.train).__name__}, loaded in {summary['load_seconds']} s")
    if bundle.skipped:
        print(f"  skipped    {len(bundle.skipped)}: {'; '.join(bundle.skipped[:5])}")
    return 0
