"""``resnetlab benchmark``: speed and memory of a model on a backend, with torchvision as the yardstick."""

from __future__ import annotations

import argparse

from resnetlab.cli.common import add_json_flag, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="throughput, latency percentiles and memory vs torchvision",
                       description="Synthetic inputs; torchvision's model of the same name is measured in the "
                                   "same run when it exists.")  # fmt: skip
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, help="input side (default: the model's)")
    p.add_argument("--backend", default="eager", choices=["eager", "compile", "torchscript", "onnxruntime"])
    p.add_argument("--train", action="store_true", help="time a training step (forward, backward, SGD)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into convs (inference)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no-compare", dest="compare", action="store_false", help="skip the torchvision yardstick")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print (or emit as JSON) the measurement."""
    from resnetlab.benchmark import benchmark

    r = benchmark(args.model, batch=args.batch, image_size=args.image_size, backend=args.backend, train=args.train,
                  device=args.device, fold_bn=args.fold_bn, channels_last=args.channels_last, threads=args.threads,
                  warmup=args.warmup, iters=args.iters, compare=args.compare)  # fmt: skip
    if args.json:
        print_json(r)
        return 0
    head = (f"{r['model']} {r['mode']}, batch {r['batch']} at {r['image_size']}px, {r['device']}, "
            f"{r['threads']} threads, backend {r['backend']}{' +fold-bn' if r['fold_bn'] else ''}")  # fmt: skip
    print(head)
    rows = [("resnetlab", r["resnetlab"])] + ([("torchvision eager", r["torchvision_eager"])]
                                             if "torchvision_eager" in r else [])  # fmt: skip
    for label, s in rows:
        print(f"  {label:<17} p50 {s['p50_ms']:9.2f} ms  p90 {s['p90_ms']:9.2f} ms  p99 {s['p99_ms']:9.2f} ms  "
              f"{s['images_per_second']:9.1f} img/s")  # fmt: skip
    if "speedup_vs_torchvision" in r:
        print(f"  speed-up over torchvision eager: {r['speedup_vs_torchvision']:.2f}x")
    print(f"  peak memory {r['peak_memory_mb']:.0f} MB")
    return 0
