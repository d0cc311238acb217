"""``resnetlab features``: pooled embeddings of images, saved with their file names."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resnetlab.cli.common import (
    add_batch_size,
    add_device,
    add_json_flag,
    add_model_source,
    display_path,
    non_negative_int,
    print_json,
    source_options,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features",
                       description="One embedding per image, preprocessed as the model expects. Unreadable "
                       "files are reported and skipped.")  # fmt: skip
    add_model_source(p)
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="NAME.npy (+ NAME.csv, NAME.json) or NAME.parquet")
    p.add_argument("--stage", type=non_negative_int, help="pool this stage instead of the last (0 = stem, 1..N)")
    add_batch_size(p, 32)
    add_device(p)
    add_json_flag(p)
    p.set_defaults(func=features)


def features(args: argparse.Namespace) -> int:
    from resnetlab.data.images import collect_images
    from resnetlab.inference import Predictor
    from resnetlab.sources import load_resnet
    from resnetlab.transfer.features import extract_features

    files = collect_images(args.inputs)
    predictor = Predictor(load_resnet(args.source, **source_options(args)), device=args.device)
    embeddings = extract_features(predictor, files, stage=args.stage, batch_size=args.batch_size,
                                  progress=not args.json)  # fmt: skip
    source = Path(args.source)
    embeddings.meta.update(source=str(source.resolve()) if source.exists() else args.source,
                           pretrained=args.pretrained)  # fmt: skip
    out = embeddings.save(args.out)
    for path, reason in embeddings.failed:
        print(f"skipped {display_path(path)}: {display_path(reason)}", file=sys.stderr)
    summary = {"out": str(out), "count": len(embeddings.files), "dim": int(embeddings.vectors.shape[1]),
               "skipped": [{"file": f, "reason": r} for f, r in embeddings.failed]}  # fmt: skip
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {out}: {summary['count']} embeddings of {summary['dim']} dims, "
              f"{len(embeddings.failed)} skipped")  # fmt: skip
    return 0
