"""End-to-end throughput of ``Predictor.predict_files`` on a folder of photos, decoding included.

    python benchmarks/predict_throughput.py --from MODEL FOLDER [--backend best] [--batch-size 16] [--json]

Prints images per second for: the model alone on batches of ``--batch-size`` preprocessed images (the
ceiling), ``predict_files`` with decoding in parallel threads (one per core, the next batch decoded while
the model runs), and with decoding in one thread, all with the same backend. Model loading and the
``best`` choice are not timed. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from resnetlab.data.images import collect_images
    from resnetlab.inference import Predictor

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", required=True)
    parser.add_argument("folder")
    parser.add_argument("--backend", default="best")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    files = collect_images([args.folder])
    predictor = Predictor.load(args.source, backend=args.backend, batch_size=args.batch_size, check_images=files[:16])
    x = torch.stack([predictor.preprocess(f) for f in files[: args.batch_size]])
    predictor.logits(x)  # warm-up
    start, rounds = time.perf_counter(), 5
    for _ in range(rounds):
        predictor.logits(x)
    model_only = rounds * len(x) / (time.perf_counter() - start)
    report = {"images": len(files), "batch_size": args.batch_size, "backend": predictor.backend_reason,
              "threads": torch.get_num_threads(), "model_only_images_per_second": round(model_only, 1)}  # fmt: skip
    for label, workers in (("parallel_decode", None), ("one_decode_thread", 1)):
        start = time.perf_counter()
        done, failed = predictor.predict_files(files, batch_size=args.batch_size, workers=workers)
        seconds = time.perf_counter() - start
        report[label] = {"seconds": round(seconds, 2), "images_per_second": round(len(done) / seconds, 1),
                         "failed": len(failed)}  # fmt: skip
    report["end_to_end_vs_model_only"] = round(report["parallel_decode"]["images_per_second"] / model_only, 3)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{len(files)} images, batch {args.batch_size}, backend {report['backend']}")
    print(f"  model only (preprocessed batches): {model_only:8.1f} img/s")
    for label in ("parallel_decode", "one_decode_thread"):
        row = report[label]
        print(f"  predict_files, {label.replace('_', ' '):<18} {row['images_per_second']:8.1f} img/s "
              f"({row['seconds']:.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
