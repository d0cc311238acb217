"""``resnetlab study degradation|gradients|lesion|responses``."""

from __future__ import annotations

import argparse
from pathlib import Path

from resnetlab.cli.common import (
    add_json_flag,
    add_weights_options,
    check_output_dir,
    non_negative_int,
    positive_float,
    positive_int,
    print_json,
    seed_int,
)


def _ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers (depths)."""
    values = tuple(positive_int(v) for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated depths, e.g. 20,56, got {text[:40]!r}")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study")
    kinds = study.add_subparsers(dest="study", metavar="STUDY", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data",
            help="dataset, e.g. ../shared/data/cifar10-jpeg.tar.xz (default: digits; for "
            "lesion and responses, the data the models were trained on)",
        )
        p.add_argument("--out", help="output folder (default runs/studies/<time>-<study>)")
        p.add_argument("--seed", type=seed_int, default=0)
        add_json_flag(p)

    p = kinds.add_parser("degradation", help="plain vs residual twins of several depths (paper Fig. 6)")
    p.add_argument("--depths", type=_ints, default=(20, 32, 44, 56), help="comma-separated, e.g. 20,32,44,56")
    p.add_argument("--recipe", default="demo")
    p.add_argument("--max-iters", type=positive_int, help="training steps per model")
    p.add_argument("--subset", type=positive_int, help="train on this many images")
    p.add_argument("--test-subset", type=positive_int, help="evaluate on this many images")
    p.add_argument(
        "--eval-every", type=non_negative_int, default=0, help="steps between evaluations (default: per epoch)"
    )
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--resume", action="store_true", help="continue the models of --out that have a checkpoint")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other training option of the recipe, e.g. milestones=[400,600]",
    )
    common(p)
    p.set_defaults(func=degradation)

    p = kinds.add_parser("gradients", help="per-layer gradient norms, plain vs residual")
    p.add_argument(
        "--depths",
        type=_ints,
        default=(20, 56, 110),
        help="e.g. 20,56,110,1202 (1202: minutes on CPU and ~9 GB of memory at --batch-size 16)",
    )
    p.add_argument("--norms", default="batchnorm,none", help="norm layers to compare at initialisation")
    p.add_argument("--train-steps", type=non_negative_int, default=0, help="also record gradients over this many steps")
    p.add_argument("--train-depths", type=_ints, help="depths to train (default: all of --depths), e.g. 20,56,110")
    p.add_argument("--record-every", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--subset", type=positive_int)
    common(p)
    p.set_defaults(func=gradients)

    p = kinds.add_parser("lesion", help="delete residual blocks at test time (Veit et al. 2016)")
    p.add_argument("--from", dest="source", required=True, help="run/model folder, checkpoint, or a model name")
    add_weights_options(p)
    p.add_argument("--plain", help="a trained plain net to lesion for comparison")
    p.add_argument("--test-subset", type=positive_int, default=2000)
    p.add_argument("--samples", type=positive_int, default=5, help="random draws per number of deleted blocks")
    p.add_argument("--path-samples", type=positive_int, default=3, help="sampled paths per path length")
    p.add_argument("--path-images", type=positive_int, default=100, help="test images for the path gradients")
    common(p)
    p.set_defaults(func=lesion)

    p = kinds.add_parser("responses", help="std of each layer's response (paper Fig. 7)")
    p.add_argument("--from", dest="sources", nargs="+", required=True, help="models to compare")
    add_weights_options(p)
    p.add_argument("--test-subset", type=positive_int, default=1000)
    common(p)
    p.set_defaults(func=responses)


def _check_out(args: argparse.Namespace) -> None:
    if args.out:
        check_output_dir(args.out, "--out")


def _finish(args: argparse.Namespace, summary: dict) -> int:
    """The summary as JSON, or the report's text and the paths of its figures (a terminal shows no images)."""
    from resnetlab.studies.common import report_text

    if args.json:
        print_json(summary)
    else:
        folder = Path(summary["folder"])
        print(report_text(folder))
        for figure in summary.get("figures", ()):
            print(f"figure: {figure}")
        print(f"report: {folder / 'report.md'}")
        print(f"outputs: {folder}")
    return 0


def degradation(args: argparse.Namespace) -> int:
    """Train plain and residual twins; report whether the deeper plain net trains worse."""
    from resnetlab.studies import degradation_study

    _check_out(args)

    from resnetlab.train.config import parse_set_option

    extra = dict(parse_set_option(item) for item in args.set)
    extra.update({k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None})
    return _finish(args, degradation_study(
        args.depths, data=args.data, recipe=args.recipe, max_iters=args.max_iters, subset=args.subset,
        test_subset=args.test_subset, eval_every=args.eval_every, out=args.out, seed=args.seed, resume=args.resume,
        **extra,
    ))  # fmt: skip


def gradients(args: argparse.Namespace) -> int:
    """Gradient norms per layer at initialisation (and during training)."""
    from resnetlab.studies import gradients_study

    _check_out(args)

    return _finish(args, gradients_study(
        args.depths, norms=tuple(args.norms.split(",")), data=args.data, train_steps=args.train_steps,
        train_depths=args.train_depths, record_every=args.record_every, batch_size=args.batch_size,
        subset=args.subset, out=args.out, seed=args.seed,
    ))  # fmt: skip


def lesion(args: argparse.Namespace) -> int:
    """Accuracy after deleting residual blocks, and the path-length picture."""
    from resnetlab.studies import lesion_study

    _check_out(args)

    return _finish(args, lesion_study(
        args.source, plain=args.plain, pretrained=args.pretrained, random_init=args.random_init, data=args.data,
        test_subset=args.test_subset,
        samples=args.samples, path_samples=args.path_samples, path_images=args.path_images, out=args.out,
        seed=args.seed,
    ))  # fmt: skip


def responses(args: argparse.Namespace) -> int:
    """Standard deviation of each layer's response, per model."""
    from resnetlab.studies import responses_study

    _check_out(args)

    return _finish(args, responses_study(
        args.sources, pretrained=args.pretrained, random_init=args.random_init, data=args.data,
        test_subset=args.test_subset, out=args.out,
        seed=args.seed,
    ))  # fmt: skip
