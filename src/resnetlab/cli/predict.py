"""``resnetlab predict``: top-k classes for images or folders of images."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

from resnetlab.cli.common import (
    add_backend,
    add_batch_size,
    add_device,
    add_json_flag,
    add_model_source,
    backend_options,
    check_output_file,
    display_path,
    positive_int,
    print_json,
    source_options,
)
from resnetlab.errors import DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", description="Top-k labels with probabilities. Preprocessing comes from the model.")
    add_model_source(p, exports=True)
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=positive_int, default=5, help="labels per image (default 5)")
    add_batch_size(p, 32)
    add_device(p)
    add_backend(p)
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


def _write_csv(path: Path, done: list[tuple[str, Any]], top_k: int) -> None:
    """One row per image, written whole or not at all (a failure never leaves a partial file)."""
    from resnetlab.train.checkpoint import atomic_write_bytes

    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["file", *[f"{kind}{i + 1}" for i in range(top_k) for kind in ("label", "prob")]])
    for name, prediction in done:
        cells = [v for lab, p in zip(prediction.labels, prediction.probabilities) for v in (lab, f"{p:.6f}")]
        writer.writerow([name, *cells])
    atomic_write_bytes(path, text.getvalue().encode())


def predict(args: argparse.Namespace) -> int:
    """Classify every image; unreadable files are reported on stderr and skipped."""
    from resnetlab.data.images import IMAGE_SUFFIXES, collect_images
    from resnetlab.inference import Predictor

    files = collect_images(args.inputs)
    if not files:
        raise DataError(f"no images in {', '.join(args.inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    csv_path = args.csv or (default_csv() if any(Path(i).is_dir() for i in args.inputs) else None)
    if csv_path:  # before predicting: a path that cannot be written would lose every prediction
        check_output_file(csv_path, "--csv")
    predictor = Predictor.load(args.source, device=args.device, batch_size=args.batch_size, check_images=files[:16],
                               **backend_options(args), **source_options(args))  # fmt: skip
    done, failed = predictor.predict_files(files, batch_size=args.batch_size, top_k=args.top_k,
                                           progress=not args.json and len(files) > args.batch_size)  # fmt: skip
    # A file name that is not UTF-8 is shown with \x escapes; printing it as is would crash half-way.
    done = [(display_path(name), prediction) for name, prediction in done]
    failed = [(display_path(name), display_path(reason)) for name, reason in failed]
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not done:
        raise DataError(f"none of the {len(failed)} input(s) could be read as an image")
    print(f"backend {predictor.backend_reason}", file=sys.stderr)  # which path answered, once there are answers
    if csv_path:
        _write_csv(csv_path, done, args.top_k)
    if args.json:
        print_json({"predictions": [{"file": path, **p.to_dict()} for path, p in done],
                    "skipped": [{"file": path, "reason": reason} for path, reason in failed],
                    "csv": str(csv_path) if csv_path else None,
                    "backend": predictor.metadata["backend"], "backend_reason": predictor.backend_reason})  # fmt: skip
        return 0
    for path, prediction in done:
        best = ", ".join(f"{lab} {p:.3f}" for lab, p in zip(prediction.labels, prediction.probabilities))
        print(f"{path}: {best}")
    if csv_path:
        kept = "; predictions.csv was already there and is kept" if csv_path.name != "predictions.csv" else ""
        print(f"wrote {csv_path} ({len(done)} images, {len(failed)} skipped){'' if args.csv else kept}")
    return 0
