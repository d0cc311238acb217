"""``resnetlab predict``: top-k classes for images or folders of images."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from resnetlab.cli.common import add_json_flag, add_model_source, print_json, source_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images with a trained model",
                       description="Top-k labels with probabilities. Preprocessing comes from the model.")  # fmt: skip
    add_model_source(p, exports=True)
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--csv",
        type=Path,
        help="write one row per image here (default for folders: predictions.csv "
        "in the current folder, or predictions-1.csv, -2, ... if that exists: nothing is overwritten)",
    )
    add_json_flag(p)
    p.set_defaults(func=predict)


def default_csv(folder: Path = Path()) -> Path:
    """``predictions.csv`` in ``folder``, or the first free ``predictions-N.csv``: earlier results stay."""
    path, n = folder / "predictions.csv", 0
    while path.exists():
        n += 1
        path = folder / f"predictions-{n}.csv"
    return path


def predict(args: argparse.Namespace) -> int:
    """Classify every image; unreadable files are reported on stderr and skipped."""
    from resnetlab.data.images import collect_images
    from resnetlab.inference import Predictor

    files = collect_images(args.inputs)
    csv_path = args.csv or (default_csv() if any(Path(i).is_dir() for i in args.inputs) else None)
    predictor = Predictor.load(args.source, device=args.device, **source_options(args))
    done, failed = predictor.predict_files(files, batch_size=args.batch_size, top_k=args.top_k,
                                           progress=not args.json and len(files) > args.batch_size)  # fmt: skip
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", *[f"{kind}{i + 1}" for i in range(args.top_k) for kind in ("label", "prob")]])
            for path, prediction in done:
                cells = [v for lab, p in zip(prediction.labels, prediction.probabilities) for v in (lab, f"{p:.6f}")]
                writer.writerow([path, *cells])
    if args.json:
        print_json({"predictions": [{"file": path, **p.to_dict()} for path, p in done],
                    "skipped": [{"file": path, "reason": reason} for path, reason in failed],
                    "csv": str(csv_path) if csv_path else None})  # fmt: skip
        return 0
    for path, prediction in done:
        best = ", ".join(f"{lab} {p:.3f}" for lab, p in zip(prediction.labels, prediction.probabilities))
        print(f"{path}: {best}")
    if csv_path:
        kept = "; predictions.csv was already there and is kept" if csv_path.name != "predictions.csv" else ""
        print(f"wrote {csv_path} ({len(done)} images, {len(failed)} skipped){'' if args.csv else kept}")
    return 0
