"""``resnetlab explain``: class-activation maps of images, as overlay PNGs and raw .npy maps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from resnetlab.cli.common import (
    add_device,
    add_json_flag,
    add_model_source,
    check_output_dir,
    display_path,
    positive_int,
    print_json,
    source_options,
)
from resnetlab.errors import ConfigError, DataError

#: The methods, as ``resnetlab.explain.METHODS`` names them (listed here so ``--help`` needs no torch).
METHOD_NAMES = ("gradcam", "gradcam++", "scorecam", "occlusion")


def _stage(text: str) -> int:
    """argparse type: a stage number (1..N, or negative from the end; checked against the model later)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a stage number (1 = first stage, -1 = last)") from None
    if value == 0:
        raise argparse.ArgumentTypeError("stages count from 1 (or -1 for the last)")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        description="Where the model looked: a class-activation map per image, written as an overlay PNG (photo, "
        "heat map, class and probability) and the raw map (.npy, values in [0, 1] at the model's input size).",
    )
    add_model_source(p, exports=True)
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="folder for IMAGE.png overlays and IMAGE.npy maps")
    p.add_argument("--target", help="class name or index to explain (default: each image's predicted class)")
    p.add_argument("--stage", type=_stage, help="stage whose output is weighted, 1..N (default: the last, N)")
    p.add_argument("--method", choices=METHOD_NAMES, default=None,
                   help="gradcam (default), gradcam++, scorecam or occlusion (the default for exports, "
                   "which have no gradients)")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="masked images per forward pass for scorecam and occlusion (default 64)")  # fmt: skip
    add_device(p)
    add_json_flag(p)
    p.set_defaults(func=explain)


def class_index(target: str, labels: list[str]) -> int:
    """``--target``: a class name (exact, then case-insensitive) or an index into ``labels``."""
    if target in labels:
        return labels.index(target)
    folded = [label.casefold() for label in labels]
    if target.casefold() in folded:
        return folded.index(target.casefold())
    if target.lstrip("-").isdigit():
        index = int(target)
        if 0 <= index < len(labels):
            return index
        raise ConfigError(f"--target {target}: the model has classes 0..{len(labels) - 1}")
    shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
    raise ConfigError(f"--target {target!r} is not one of the model's classes ({shown}) nor an index")


def _unique_stems(files: list[str]) -> list[str]:
    """Output names: each file's stem, with -2, -3, ... where two inputs share one."""
    seen: dict[str, int] = {}
    names = []
    for file in files:
        stem = Path(file).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def explain(args: argparse.Namespace) -> int:
    """Explain every readable image; unreadable ones are reported on stderr and skipped."""
    import numpy as np
    import torch

    from resnetlab.data.images import IMAGE_SUFFIXES, collect_images
    from resnetlab.explain import BLACK_BOX_METHODS, cam_maps, model_view, overlay, resolve_stage
    from resnetlab.inference import Predictor

    files = collect_images(args.inputs)
    if not files:
        raise DataError(f"no images in {', '.join(args.inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    out = check_output_dir(args.out, "--out")
    predictor = Predictor.load(args.source, device=args.device, **source_options(args))
    model = predictor.model
    white_box = hasattr(model, "stage_names")
    method = args.method or ("gradcam" if white_box else BLACK_BOX_METHODS[0])
    if not white_box and method not in BLACK_BOX_METHODS:
        raise ConfigError(f"--method {method} needs the model's gradients or stages, which the exported {model.name} "
                          f"does not have: use --method {' or '.join(BLACK_BOX_METHODS)}, or pass the run or model "
                          "folder it was exported from")  # fmt: skip
    if args.stage is not None and method in BLACK_BOX_METHODS:
        raise ConfigError(f"--stage does not apply to {method}, which hides patches of the input; drop it")
    stage = resolve_stage(model, args.stage) if method not in BLACK_BOX_METHODS else None
    target = None if args.target is None else class_index(args.target, predictor.labels)

    results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    tensors, names = [], []
    for file in files:
        try:
            tensors.append(predictor.preprocess(file))
            names.append(file)
        except DataError as err:
            skipped.append({"file": display_path(file), "reason": display_path(str(err))})
            print(f"skipped {display_path(file)}: {display_path(str(err))}", file=sys.stderr)
    if not tensors:
        raise DataError(f"none of the {len(skipped)} input(s) could be read as an image")
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    for name, stem, x in zip(names, _unique_stems(names), tensors):
        batch = x[None].to(predictor.device)
        maps, logits = cam_maps(model, batch, method=method, target=target, stage=stage, batch_size=args.batch_size)
        probabilities = logits.softmax(1)[0]
        explained = int(logits[0].argmax()) if target is None else target
        cam = maps[0, 0].cpu()
        label, probability = predictor.labels[explained], float(probabilities[explained])
        picture = overlay(model_view(x, c.mean, c.std)[0], cam, label=label, probability=probability)
        png, npy = out / f"{stem}.png", out / f"{stem}.npy"
        picture.save(png)
        with open(npy, "wb") as handle:
            np.save(handle, cam.numpy().astype(np.float32))
        predicted = int(probabilities.argmax())
        results.append({"file": display_path(name), "overlay": str(png), "map": str(npy), "class": label,
                        "index": explained, "probability": round(probability, 6),
                        "predicted": predictor.labels[predicted],
                        "predicted_probability": round(float(probabilities[predicted]), 6),
                        "peak": [int(v) for v in np.unravel_index(int(torch.argmax(cam)), cam.shape)]})  # fmt: skip
    summary = {"model": model.name, "method": method, "stage": stage, "target": args.target,
               "explained": results, "skipped": skipped, "out": str(out)}  # fmt: skip
    if args.json:
        print_json(summary)
    else:
        where = f" at stage {stage}" if stage else ""
        for r in results:
            print(f"{r['file']}: {method}{where} for {r['class']} ({r['probability']:.3f}) -> {r['overlay']}, "
                  f"{r['map']}")  # fmt: skip
    if skipped:  # the maps of the readable images are written, but the run did not do all it was asked
        print(
            f"resnetlab: error: {len(skipped)} of {len(files)} input(s) could not be read (see above)", file=sys.stderr
        )
        return 1
    return 0
