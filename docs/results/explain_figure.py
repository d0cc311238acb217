"""The class-activation maps of every method for your own images: one row per image (the image as the model
sees it, then each method's overlay for the predicted class), as in docs/figures/explain_cat.png.

    PYTHONPATH=src python docs/results/explain_figure.py --from SOURCE IMAGE [IMAGE ...] --out FIGURE.png

SOURCE is anything ``resnetlab explain --from`` reads that has gradients (a run or model folder, a weights
file, a model name with --pretrained).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from explain_checks import figure  # this folder's script

from resnetlab.inference import Predictor
from resnetlab.sources import load_resnet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="model source (run or model folder, ...)")
    parser.add_argument("--pretrained", help="published weights tag, for a model name")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    model = load_resnet(args.source, pretrained=args.pretrained).eval()
    c = model.config
    predictor = Predictor(model)  # the preprocessing of predict, serve and explain
    images = torch.stack([predictor.preprocess(path) for path in args.images])
    with torch.no_grad():
        predicted = model(images).argmax(1)
    classes = list(c.label_names or [str(i) for i in range(c.num_classes)])
    size = c.input_size[-1]
    figure(model, images, predicted, classes, args.out, photo_caption=f"input ({size} px)",
           title=f"Class-activation maps for the predicted class: {model.name} ({Path(args.source).name})")  # fmt: skip
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
