"""Measure whether resnetlab's class-activation maps mean something (docs/results/explain.md).

On the published CIFAR-10 ResNet-56 (akamaster weights, from the shared folder) and the CIFAR-10 JPEG test set:

- the randomisation sanity check: Spearman rank correlation between each method's maps of the trained net
  and of the same net re-initialised, per stage;
- the pointing game on 2x2 mosaics (64x64) of correctly classified test images of four different classes:
  how often the map of each tile's class peaks in that tile's quadrant (chance 25%), per method and stage;
- optionally a figure of overlays for a few test images (--figure).

    PYTHONPATH=src python docs/results/explain_checks.py --json > docs/results/explain.json

Prints one JSON object. Needs RESNETLAB_SHARED (default ../shared) with data/cifar10-jpeg.tar.xz and
weights/cifar10-akamaster/resnet56-4bfd9763.th.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from resnetlab.data import build_data
from resnetlab.errors import DataError
from resnetlab.explain import METHODS, cam_maps, model_view, overlay
from resnetlab.explain.checks import (
    correctly_classified,
    make_mosaics,
    normalise_uint8,
    pointing_game,
    randomisation_check,
)
from resnetlab.paths import shared_dir
from resnetlab.sources import load_model

WEIGHTS = "weights/cifar10-akamaster/resnet56-4bfd9763.th"
DATA = "data/cifar10-jpeg.tar.xz"
#: Occlusion on the 64 px mosaics: 16 px patches (half a tile side), stride 8, 7x7 = 49 masked passes.
MOSAIC_OCCLUSION = dict(patch=16, stride=8)


def _shared(relative: str) -> Path:
    path = shared_dir() / relative
    if not path.exists():
        raise DataError(f"{path} is missing: set RESNETLAB_SHARED to the shared data folder")
    return path


def _stages(method: str, count: int) -> list[int | None]:
    return [None] if method == "occlusion" else list(range(1, count + 1))


def figure(model: Any, images: torch.Tensor, labels: torch.Tensor, classes: list[str], path: Path, *,
           title: str, photo_caption: str) -> None:
    """A grid: one image per row (the photo, then each method's overlay for the class ``labels`` names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(METHODS)
    photos = model_view(images, model.config.mean, model.config.std)
    fig, axes = plt.subplots(len(images), len(methods) + 1, figsize=(2.1 * (len(methods) + 1), 2.3 * len(images)),
                             squeeze=False)  # fmt: skip
    stage = f" (stage {len(model.stage_names)})"
    for m, method in enumerate(methods):
        maps, logits = cam_maps(model, images, method=method, target=labels)
        probabilities = logits.softmax(1)
        for i in range(len(images)):
            axes[i, m + 1].imshow(overlay(photos[i], maps[i, 0]))
            if i == 0:
                axes[i, m + 1].set_title(method + ("" if method == "occlusion" else stage), fontsize=9)
            if m == 0:
                axes[i, 0].imshow(photos[i].resize((256, 256)))
                axes[i, 0].set_ylabel(f"{classes[labels[i]]}\np={float(probabilities[i, labels[i]]):.2f}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title(photo_caption, fontsize=9)
    fig.suptitle(f"{title}\nred = high (1), blue = low (0); maps are min-max scaled per image", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)  # a 256-colour PNG: 1/4 the size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="test images for the randomisation check")
    parser.add_argument("--mosaics", type=int, default=200, help="mosaics for the pointing game")
    parser.add_argument("--slow-images", type=int, help="images for scorecam and occlusion (default: --images)")
    parser.add_argument("--slow-mosaics", type=int, help="mosaics for scorecam and occlusion (default: --mosaics)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--pool", type=int, default=2000, help="shuffled test images the checks draw from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, help="write the overlay figure here (PNG)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object (the default)")
    args = parser.parse_args(argv)

    model = load_model(_shared(WEIGHTS)).eval()
    bundle = build_data(_shared(DATA), augment="none")
    # The test set is stored class by class: a seeded shuffle gives every class its share of the --pool
    # images that the checks draw from (the randomisation check takes the first ones, right or wrong).
    shuffled = torch.randperm(len(bundle.test.targets), generator=torch.Generator().manual_seed(args.seed))
    pool = shuffled[: args.pool]
    images = normalise_uint8(bundle.test.images[pool], model.config.mean, model.config.std)
    labels = torch.tensor(bundle.test.targets)[pool]
    started = time.perf_counter()
    ok = correctly_classified(model, images, labels)
    result: dict[str, Any] = {
        "model": "resnet56 (cifar10_akamaster)", "data": "CIFAR-10 JPEG test set", "seed": args.seed,
        "pool": len(pool), "pool_accuracy": round(float(ok.float().mean()), 4),
        "randomisation": [], "pointing_game": [],
    }  # fmt: skip
    stage_total = len(model.stage_names)
    if args.figure:
        picks = torch.tensor([int(torch.nonzero(ok & (labels == c))[0]) for c in (0, 3, 5, 7, 8)])
        title = "Class-activation maps for the true class: CIFAR ResNet-56 (published weights), CIFAR-10 test set"
        figure(model, images[picks], labels[picks], list(bundle.classes), args.figure, title=title,
               photo_caption="test image (32 px)")
        result["figure"] = str(args.figure)

    # Pointing game on mosaics of correctly classified pool images (four different classes each), and the
    # randomisation check on the first pool images (right or wrong), true-class maps; each row is also
    # printed to stderr as soon as it is measured.
    most = max(args.mosaics, args.slow_mosaics or 0)
    mosaics, classes = make_mosaics(images[ok], labels[ok], most, seed=args.seed) if most else (None, None)
    for method in args.methods:
        slow = method in ("scorecam", "occlusion")
        n_mosaics = (args.slow_mosaics or args.mosaics) if slow else args.mosaics
        n_images = (args.slow_images or args.images) if slow else args.images
        for stage in _stages(method, stage_total):
            if n_mosaics:
                options = MOSAIC_OCCLUSION if method == "occlusion" else {}
                game = pointing_game(model, mosaics[:n_mosaics], classes[:n_mosaics], method=method, stage=stage,
                                     **options)  # fmt: skip
                result["pointing_game"].append(game.to_dict())
                print(json.dumps(game.to_dict()), file=sys.stderr, flush=True)
            if not n_images:
                continue
            check = randomisation_check(model, images[:n_images], labels[:n_images], method=method, stage=stage,
                                        seed=args.seed)  # fmt: skip
            result["randomisation"].append(check.to_dict())
            print(json.dumps(check.to_dict()), file=sys.stderr, flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
