"""``resnetlab train`` and ``resnetlab eval``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from resnetlab.cli.common import (
    ALLOW_PROGRAM_HELP,
    add_batch_size,
    add_device,
    add_json_flag,
    add_num_workers,
    add_training_options,
    add_weights_options,
    check_output_dir,
    check_run_dir,
    print_json,
    run_options,
    source_options,
    training_overrides,
)


def register(sub: argparse._SubParsersAction) -> None:
    from resnetlab.train.config import recipe_names

    p = sub.add_parser(
        "train",
        description="Train a model of the family. With no arguments: the embedded demo (ResNet-20 on "
        f"scikit-learn's digits). Recipes: {', '.join(recipe_names())}, or a YAML file.",
    )
    p.add_argument("--recipe", help="named recipe or YAML file (default: demo)")
    add_training_options(p)
    p.add_argument(
        "--resume",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="continue an interrupted run with its saved config; only how it runs may change "
        "(--device, --num-workers, --no-progress, --set eval_every=..., ...)",
    )
    p.add_argument(
        "--auto-resume",
        dest="auto_resume",
        action="store_true",
        default=None,
        help="continue from --run-dir's last checkpoint when there is one (for torchrun --max-restarts)",
    )
    add_json_flag(p)
    p.set_defaults(func=train_command)

    p = sub.add_parser("eval", description="Top-1/top-5, per-class accuracy and a confusion-matrix PNG.")
    p.add_argument("model", help="a run folder, a save_pretrained folder, a checkpoint, an exported model, a "
                   "weights file, or a model name (with --pretrained TAG)")  # fmt: skip
    p.add_argument("--data", help="dataset (default: the one the model records it was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    add_weights_options(p)
    p.add_argument("--allow-program", action="store_true", help=ALLOW_PROGRAM_HELP)
    add_batch_size(p, 256)
    add_device(p, "auto")
    add_num_workers(p)
    p.add_argument(
        "--ten-crop",
        action="store_true",
        help="average the paper's 10 crops (corners + center, and their mirrors; 5 when not flipped)",
    )
    p.add_argument("--out", help="folder for the confusion matrix, per_class.csv and eval.json (default: the run's "
                   "eval/ folder, or runs/eval/<source>/)")  # fmt: skip
    add_json_flag(p)
    p.set_defaults(func=eval_command)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = training_overrides(args)
    if args.auto_resume is not None:
        values["auto_resume"] = args.auto_resume
    return values


def train_command(args: argparse.Namespace) -> int:
    """Train per the recipe and overrides (or continue a run); print where the outputs are."""
    from resnetlab.errors import ConfigError
    from resnetlab.train.config import load_recipe
    from resnetlab.train.engine import saved_config, train

    if args.resume:
        if args.recipe:
            raise ConfigError("--resume continues a run with its saved recipe; drop --recipe")
        result = train(saved_config(args.resume).replace(**_overrides(args)), resume=args.resume,
                       **run_options(args))  # fmt: skip
    else:
        cfg = load_recipe(args.recipe or "demo", **_overrides(args))
        if cfg.data is not None and not args.recipe and not cfg.pretrained and "model" not in _overrides(args):
            cfg = _model_for_data(cfg)
        check_run_dir(cfg)
        result = train(cfg, **run_options(args))
    if args.json:
        print_json(result.summary())
        return 0
    if result.selected == "best-val":
        print(f"best val top-1 {result.best_accuracy:.2f}% (the exported model), final {result.final_accuracy:.2f}%, "
              f"after {result.steps} steps in {result.seconds:.1f} s")  # fmt: skip
        if result.test_accuracy is not None:
            print(f"the model selected on val, on the test set: top-1 {result.test_accuracy:.2f}%")
    elif not result.evaluated:
        print(f"final model after {result.steps} steps in {result.seconds:.1f} s: not evaluated (the data has no "
              "test split; --val-split 0.1 holds out part of train to evaluate on)")  # fmt: skip
    else:
        print(f"final model: {'test' if result.test_accuracy is not None else 'eval'} top-1 "
              f"{result.final_accuracy:.2f}% after {result.steps} steps in {result.seconds:.1f} s (peak during "
              f"training {result.best_accuracy:.2f}%, not used to choose the model)")  # fmt: skip
    print(f"run folder: {result.run_dir}  (metrics.csv, curves.png, tensorboard/, checkpoints/)")
    print(f"model:      {result.model_dir}  (use with resnetlab eval / predict / export)")
    return 0


def _model_for_data(cfg: Any) -> Any:
    """The demo recipe's ResNet-20 suits small images; for photos pick ResNet-18 (and say which, and why)."""
    import sys

    from resnetlab.sources import model_for_data

    name, why = model_for_data(cfg.data, image_size=cfg.image_size, download=cfg.download)
    print(f"resnetlab: no --model given: training {name} ({why}); pass --model to choose another", file=sys.stderr)
    return cfg.replace(model=name)


def eval_command(args: argparse.Namespace) -> int:
    """Evaluate a trained model; write the confusion matrix and per-class accuracy."""
    from resnetlab.train.evaluation import evaluate_model

    if args.out:
        check_output_dir(args.out, "--out")
    report = evaluate_model(
        args.model, data=args.data, split=args.split, **source_options(args), batch_size=args.batch_size,
        device=args.device, ten_crop=args.ten_crop, num_workers=args.num_workers,
        out_dir=Path(args.out) if args.out else None, progress=True,
    )  # fmt: skip
    if args.json:
        print_json(report)
        return 0
    print(f"{report['model']} on {report['data']} ({report['split']}, {report['count']} images): "
          f"top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%  loss {report['loss']:.4f}")  # fmt: skip
    width = max(len(c) for c in report["per_class"])
    for name, acc in report["per_class"].items():
        print(f"  {name:<{width}}  {acc:6.2f}%")
    print(f"confusion matrix: {report['confusion_png']}")
    print(f"reports:          {Path(report['confusion_png']).parent}")
    return 0
