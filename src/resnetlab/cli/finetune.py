"""``resnetlab finetune``: a pretrained network, a new head, and a fine-tuning strategy."""

from __future__ import annotations

import argparse

from resnetlab.cli.common import add_json_flag, print_json
from resnetlab.train.config import load_recipe, parse_set_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a pretrained model on a dataset (new head for its classes)",
        description="SOURCE: a resnetlab run/model folder or checkpoint; a torchvision/timm/Hugging Face "
        "weights file (with --model); a torchvision weights name (ResNet50_Weights.IMAGENET1K_V2); or a "
        "weights tag of --model (cifar10_akamaster, tv_in1k); 'none' trains --model from scratch.",
    )  # fmt: skip
    p.add_argument("--from", dest="source", required=True, help="what to start from (see above)")
    p.add_argument("--data", required=True, help="dataset: ImageFolder folder/archive, cifar10, ...")
    p.add_argument("--model", help="architecture, for weight files and tags (e.g. resnet50)")
    p.add_argument("--mode", default="full", choices=["linear", "partial", "full"],
                   help="linear probe, partial (freeze stem + --freeze-stages stages), or full")  # fmt: skip
    p.add_argument("--freeze-stages", type=int, default=0, help="stages kept frozen in partial mode")
    p.add_argument("--bn", default="train", choices=["train", "eval", "frozen"],
                   help="BatchNorm: train, eval (keep pretrained statistics), frozen (statistics + affine)")
    p.add_argument("--lr-decay", type=float, default=1.0,
                   help="discriminative lr: each part below the head gets this factor more (e.g. 0.5)")
    p.add_argument("--unfreeze-every", type=int, default=0,
                   help="gradual unfreezing: one more stage (from the top) every N epochs")
    p.add_argument("--recipe", default="finetune", help="training recipe (default: finetune)")
    for flag, kind in (("epochs", int), ("max_iters", int), ("batch_size", int), ("lr", float),
                       ("image_size", int), ("device", str), ("seed", int), ("run_dir", str)):  # fmt: skip
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other training option")
    add_json_flag(p)
    p.set_defaults(func=finetune)


def finetune(args: argparse.Namespace) -> int:
    from resnetlab.transfer import FinetuneStrategy
    from resnetlab.transfer import finetune as run_finetune

    overrides = dict(parse_set_option(item) for item in args.set)
    flags = ("epochs", "max_iters", "batch_size", "lr", "image_size", "device", "seed", "run_dir")
    overrides.update({k: getattr(args, k) for k in flags if getattr(args, k) is not None})
    source = None if args.source.lower() == "none" else args.source
    cfg = load_recipe(args.recipe, data=args.data, pretrained=source, progress=not args.json,
                      **({"model": args.model} if args.model else {}), **overrides)  # fmt: skip
    strategy = FinetuneStrategy(mode=args.mode, freeze_stages=args.freeze_stages, bn=args.bn,
                                lr_decay=args.lr_decay, unfreeze_every=args.unfreeze_every)  # fmt: skip
    result = run_finetune(cfg, strategy)
    if args.json:
        print_json({**result.summary(), "history": result.history})
    else:
        print(f"best val top-1 {result.best_accuracy:.2f}%, final {result.final_accuracy:.2f}%; "
              f"model saved to {result.model_dir}")  # fmt: skip
    return 0
