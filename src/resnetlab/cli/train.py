"""``resnetlab train`` and ``resnetlab eval``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from resnetlab.cli.common import ALLOW_PROGRAM_HELP, add_json_flag, add_weights_options, print_json, source_options
from resnetlab.train.config import load_recipe, parse_set_option, recipe_names

# CLI flag -> TrainConfig field, for the options users change most; everything else via --set key=value.
FLAGS: dict[str, tuple[type, str]] = {
    "model": (str, "architecture name (resnetlab models)"),
    "data": (str, "dataset: a path (folder, archive, cifar-10-batches-py) or cifar10/cifar100; default digits"),
    "pretrained": (str, "initial weights: a tag, file or save_pretrained folder"),
    "epochs": (int, "epochs (ignored when max_iters is set)"),
    "max_iters": (int, "stop after this many optimizer steps"),
    "batch_size": (int, "global batch size"),
    "lr": (float, "peak learning rate"),
    "weight_decay": (float, "weight decay"),
    "image_size": (int, "input side in pixels"),
    "val_split": (float, "hold out this fraction (or count) of train to choose the model on (0: the final model)"),
    "device": (str, "auto, cpu, cuda, cuda:N"),
    "amp": (str, "auto, bf16, fp16 or off"),
    "optimizer_impl": (str, "optimizer kernels: auto (fused where available), fused, foreach or loop"),
    "num_workers": (int, "DataLoader workers for datasets decoded per image"),
    "seed": (int, "random seed"),
    "run_dir": (str, "output folder (default runs/<time>-<model>-<data>)"),
    "grad_clip": (float, "clip the gradient norm (0: off)"),
    "label_smoothing": (float, "label smoothing"),
    "ema_decay": (float, "EMA of the weights (0: off)"),
    "eval_every": (int, "steps between evaluations (default: once per epoch, and at the end)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (no arguments: a ResNet-20 on the bundled digits)",
        description="Train a model of the family. With no arguments: the embedded demo (ResNet-20 on "
        f"scikit-learn's digits). Recipes: {', '.join(recipe_names())}, or a YAML file.",
    )  # fmt: skip
    p.add_argument("--recipe", help="named recipe or YAML file (default: demo)")
    for name, (kind, text) in FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text)
    p.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="fetch --data cifar10/cifar100 with torchvision when it is not cached (needs internet)",
    )
    p.add_argument(
        "--channels-last",
        nargs="?",
        const="true",
        choices=["auto", "true", "false"],
        help="NHWC memory format (default auto: on where it is faster: CPU, and CUDA with amp)",
    )
    p.add_argument(
        "--log-every",
        type=int,
        default=0,
        metavar="N",
        help="also log train loss, lr and img/s every N steps between evaluations (metrics.csv, log, TensorBoard)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --run-dir (its checkpoints, model and metrics) instead of refusing",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        metavar="MODE",
        help="torch.compile the training step; MODE: default, reduce-overhead (CUDA graphs, CUDA "
        "only), max-autotune, max-autotune-no-cudagraphs",
    )
    p.add_argument("--deterministic", action="store_true", default=None, help="deterministic algorithms")
    p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under torchrun")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other recipe option, e.g. --set milestones=[30,60] --set model_options={shortcut: B}",
    )
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

    p = sub.add_parser("eval", help="evaluate a trained model on a dataset",
                       description="Top-1/top-5, per-class accuracy and a confusion-matrix PNG.")  # fmt: skip
    p.add_argument("model", help="a run folder, a save_pretrained folder, a checkpoint, an exported model, a "
                   "weights file, or a model name (with --pretrained TAG)")  # fmt: skip
    p.add_argument("--data", help="dataset (default: the one the model records it was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    add_weights_options(p)
    p.add_argument("--allow-program", action="store_true", help=ALLOW_PROGRAM_HELP)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers for images decoded per item")
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
    names = [*FLAGS, "download", "channels_last", "deterministic", "sync_bn", "progress", "auto_resume"]
    values = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.compile is not None:
        values.update(compile=True, compile_mode=args.compile)
    values.update(parse_set_option(text) for text in args.set)
    if args.json:
        values.setdefault("progress", False)
    return values


def train_command(args: argparse.Namespace) -> int:
    """Train per the recipe and overrides (or continue a run); print where the outputs are."""
    from resnetlab.errors import ConfigError
    from resnetlab.train.engine import saved_config, train

    if args.resume:
        if args.recipe:
            raise ConfigError("--resume continues a run with its saved recipe; drop --recipe")
        if args.overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces it; choose one")
        result = train(saved_config(args.resume).replace(**_overrides(args)), resume=args.resume,
                       log_every=args.log_every)  # fmt: skip
    else:
        cfg = load_recipe(args.recipe or "demo", **_overrides(args))
        if cfg.data is not None and not args.recipe and not cfg.pretrained and "model" not in _overrides(args):
            cfg = _model_for_data(cfg)
        result = train(cfg, overwrite=args.overwrite, log_every=args.log_every)
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
