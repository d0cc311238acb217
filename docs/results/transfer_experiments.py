"""The runs behind docs/results/transfer.md: fine-tuned against from-scratch ResNet-20s.

From the project root, with ``../shared`` beside it (or ``RESNETLAB_SHARED``); prints one JSON line per run.

    python docs/results/transfer_experiments.py ants-bees N EPOCHS BATCH SEEDS ARMS
        ants/bees at 32 px: the first N photos per class of train (0 = all) against the whole val
        split; ARMS (comma-separated) from ARMS below.
    python docs/results/transfer_experiments.py cifar-split PRETRAIN_STEPS N EPOCHS SEEDS
        pretrain on CIFAR-10's first five classes (airplane .. deer), then fine-tune on N images per
        class of the other five (dog .. truck) against scratch; the final models are tested on all 5,000
        test images of those five (the source net was tested on 200 per class of its own five).

Run folders go to runs/transfer/ (ignored by git).
"""

import json
import os
import sys
import zipfile
from pathlib import Path

from PIL import Image, ImageOps

from resnetlab.data import build_data, load_image
from resnetlab.train import load_recipe, train
from resnetlab.transfer import FinetuneStrategy, finetune

SHARED = Path(os.environ.get("RESNETLAB_SHARED", "../shared"))
RUNS = Path("runs/transfer")
PUBLISHED = "cifar10_akamaster"  # needs RESNETLAB_WEIGHTS_PATH=../shared/weights/cifar10-akamaster
ARMS = {  # name: (source, recipe overrides, strategy)
    "pretrained": (PUBLISHED, {}, {}),
    "scratch": (None, {}, {}),
    "linear-lr0.1": (PUBLISHED, {"lr": 0.1}, {"mode": "linear"}),
    "full-lr0.001": (PUBLISHED, {"lr": 0.001}, {}),
    "partial2-bneval": (PUBLISHED, {}, {"mode": "partial", "freeze_stages": 2, "bn": "eval"}),
}


def ants_bees_32px(per_class: int) -> Path:
    """The first ``per_class`` .jpg photos per class of train (0: all) and all of val, as 32x32 PNGs."""
    root = RUNS / f"ants-bees-32px-{per_class or 'all'}"
    if not root.exists():
        with zipfile.ZipFile(SHARED / "data" / "hymenoptera.zip") as zf:
            names = sorted(n for n in zf.namelist() if n.endswith(".jpg"))
            for split in ("train", "val"):
                for label in ("ants", "bees"):
                    (root / split / label).mkdir(parents=True)
                    chosen = [n for n in names if f"/{split}/{label}/" in n]
                    for name in chosen[:per_class] if split == "train" and per_class else chosen:
                        image = ImageOps.fit(load_image(zf.read(name), name=name), (32, 32), Image.Resampling.BICUBIC)
                        image.save(root / split / label / (Path(name).stem + ".png"))
    return root


def report(result, **fields) -> None:
    print(json.dumps({**fields, "final": round(result.final_accuracy, 2), "best": round(result.best_accuracy, 2),
                      "steps": result.steps, "seconds": round(result.seconds, 1)}), flush=True)  # fmt: skip


def ants_bees(per_class: int, epochs: int, batch_size: int, seeds: list[int], arms: list[str]) -> None:
    data = ants_bees_32px(per_class)
    for seed in seeds:
        for arm in arms:
            source, overrides, strategy = ARMS[arm]
            run_dir = RUNS / f"ants-bees-{per_class}-e{epochs}-{arm}-s{seed}"
            cfg = load_recipe("finetune", model="resnet20", pretrained=source, data=str(data), image_size=32,
                              epochs=epochs, batch_size=batch_size, seed=seed, progress=False, num_workers=0,
                              run_dir=str(run_dir), **overrides)  # fmt: skip
            report(finetune(cfg, FinetuneStrategy(**strategy)), per_class=per_class, epochs=epochs, seed=seed, arm=arm)


def cifar_split(pretrain_steps: int, per_class: int, epochs: int, seeds: list[int]) -> None:
    cifar = build_data(SHARED / "data" / "cifar10-jpeg.tar.xz")
    source_classes, target_classes = cifar.classes[:5], cifar.classes[5:]
    pretrained = RUNS / f"cifar-first5-{pretrain_steps}"
    if not (pretrained / "model").exists():
        cfg = load_recipe("cifar-paper", model="resnet20", max_iters=pretrain_steps, schedule="cosine",
                          warmup_iters=min(100, pretrain_steps // 10), eval_every=pretrain_steps, progress=False,
                          num_workers=0, run_dir=str(pretrained), seed=0)  # fmt: skip
        result = train(cfg, bundle=cifar.select_classes(source_classes, eval_per_class=200))
        report(result, pretrained_on=source_classes, pretrain_steps=pretrain_steps)
    target = cifar.select_classes(target_classes, train_per_class=per_class)
    for seed in seeds:
        for arm, source in (("pretrained", str(pretrained / "model")), ("scratch", None)):
            run_dir = RUNS / f"cifar-last5-{pretrain_steps}-{per_class}-e{epochs}-{arm}-s{seed}"
            cfg = load_recipe("finetune", model="resnet20", pretrained=source, image_size=32, epochs=epochs,
                              batch_size=32, seed=seed, progress=False, num_workers=0, eval_every=10**6,
                              run_dir=str(run_dir))  # fmt: skip
            report(finetune(cfg, FinetuneStrategy(), bundle=target), per_class=per_class, epochs=epochs, seed=seed,
                   arm=arm, pretrain_steps=pretrain_steps)  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("ants-bees", "cifar-split"):
        sys.exit(__doc__)
    kind, *args = sys.argv[1:]
    if kind == "ants-bees":  # N EPOCHS BATCH SEEDS ARMS
        *numbers, seeds, arms = args
        ants_bees(*map(int, numbers), [int(s) for s in seeds.split(",")], arms.split(","))
    else:  # PRETRAIN_STEPS N EPOCHS SEEDS
        *numbers, seeds = args
        cifar_split(*map(int, numbers), [int(s) for s in seeds.split(",")])
