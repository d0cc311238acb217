"""``resnetlab finetune``: a pretrained network, a new head, and a fine-tuning strategy."""

from __future__ import annotations

import argparse

from resnetlab.cli.common import (
    add_json_flag,
    add_training_options,
    check_run_dir,
    non_negative_int,
    positive_float,
    print_json,
    run_options,
    training_overrides,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        description="SOURCE: a resnetlab run/model folder or checkpoint (its architecture and input size are "
        "kept); a published weights file (recognised by its sha256); a torchvision/timm/Hugging Face "
        "weights file (with --model); a torchvision weights name (ResNet50_Weights.IMAGENET1K_V2); or a "
        "weights tag of --model (cifar10_akamaster, tv_in1k); 'none' trains --model from scratch.",
    )  # fmt: skip
    p.add_argument("--from", dest="source", help="what to start from (see above); required unless --resume")
    p.add_argument("--data", help="dataset: ImageFolder folder/archive, cifar10, ...; required unless --resume")
    p.add_argument("--model", help="architecture of weights files, tags and 'none' (e.g. resnet50)")
    p.add_argument(
        "--mode",
        choices=["linear", "partial", "full"],
        help="linear probe, partial (freeze stem + --freeze-stages stages), or full (default)",
    )
    p.add_argument("--freeze-stages", type=non_negative_int, help="stages kept frozen in partial mode (default 0)")
    p.add_argument(
        "--bn",
        choices=["train", "eval", "frozen"],
        help="BatchNorm: train (default), eval (keep pretrained statistics), frozen (statistics + affine)",
    )
    p.add_argument(
        "--lr-decay",
        type=positive_float,
        help="discriminative lr: each part below the head gets this factor more (e.g. 0.5; default 1)",
    )
    p.add_argument(
        "--unfreeze-every",
        type=non_negative_int,
        help="gradual unfreezing: one more stage (from the top) every N epochs (default 0: off)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR_OR_CHECKPOINT",
        help="continue an interrupted fine-tuning run with its saved strategy and config",
    )
    p.add_argument("--recipe", help="training recipe (default: finetune)")
    add_training_options(p, skip=("model", "data", "pretrained"))  # the same spelling as in `resnetlab train`
    add_json_flag(p)
    p.set_defaults(func=finetune)


STRATEGY_FLAGS = ("mode", "freeze_stages", "bn", "lr_decay", "unfreeze_every")


def finetune(args: argparse.Namespace) -> int:
    from resnetlab.errors import ConfigError
    from resnetlab.train.config import load_recipe
    from resnetlab.train.engine import saved_config
    from resnetlab.transfer import FinetuneStrategy
    from resnetlab.transfer import finetune as run_finetune

    overrides = training_overrides(args)  # with --model and --data: the same TrainConfig fields
    if "pretrained" in overrides:
        raise ConfigError("name the starting weights with --from, not --set pretrained=...")
    chosen = {k: getattr(args, k) for k in STRATEGY_FLAGS if getattr(args, k) is not None}
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in ("source", "data", "model", *STRATEGY_FLAGS)
                 if getattr(args, k) is not None] + (["--recipe"] if args.recipe else [])  # fmt: skip
        if given:
            raise ConfigError(f"--resume continues the run with its saved source, data and strategy; drop "
                              f"{' '.join(given).replace('--source', '--from')}")  # fmt: skip
        result = run_finetune(saved_config(args.resume).replace(**overrides), resume=args.resume,
                              **run_options(args))  # fmt: skip
    else:
        if args.source is None or "data" not in overrides:
            raise ConfigError("resnetlab finetune needs --from SOURCE and --data DATASET (or --resume RUN_DIR)")
        source = None if args.source.lower() == "none" else args.source
        cfg = load_recipe(args.recipe or "finetune", **overrides, pretrained=source)
        check_run_dir(cfg)
        result = run_finetune(cfg, FinetuneStrategy(**chosen), **run_options(args))
    if args.json:
        print_json({**result.summary(), "history": result.history})
    elif result.selected == "best-val":
        test = f"; on the test set {result.test_accuracy:.2f}%" if result.test_accuracy is not None else ""
        print(f"best val top-1 {result.best_accuracy:.2f}% (the exported model), final {result.final_accuracy:.2f}%"
              f"{test}; model saved to {result.model_dir}")  # fmt: skip
    else:
        print(f"final model: top-1 {result.final_accuracy:.2f}% (no val split: the test set only grades); "
              f"model saved to {result.model_dir}")  # fmt: skip
    return 0
