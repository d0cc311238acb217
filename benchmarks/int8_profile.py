"""Where ONNX Runtime spends its time in fp32 and int8 ResNets: per-operator totals from its profiler.

    python benchmarks/int8_profile.py [--model resnet50] [--batch 16] [--runs 3] [--json]

Exports the model (BN folded), quantizes it statically (QDQ, per-channel int8 weights) twice, once with
int8 (signed) activations, as resnetlab did until issue 17, and once with uint8 activations, then runs
each in ONNX Runtime with profiling on and sums the kernel time of each operator type over ``--runs``
runs (after one warm-up). Calibration is on random inputs: the scales differ from real calibration, the
graph and the kernels ONNX Runtime picks for it do not. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch


def profile(path: Path, x: torch.Tensor, runs: int) -> dict[str, Any]:
    """Per-operator-type kernel time (ms per run) of the optimised graph ONNX Runtime runs for ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(1 + runs):  # the first run is a warm-up, left out below
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    start = model_runs[0]["ts"] + model_runs[0]["dur"]
    runs_seen = model_runs[1:]
    events = [e for e in events if e.get("ts", 0) >= start]
    per_op: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            per_op[op] += event["dur"] / 1000
            counts[op] += 1
    n = len(runs_seen)
    total = sum(per_op.values())
    ops = {op: {"ms_per_run": round(t / n, 2), "share": round(t / total, 3), "nodes_per_run": counts[op] // n}
           for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])}  # fmt: skip
    return {"model_run_ms": round(sum(e["dur"] for e in runs_seen) / n / 1000, 2), "ops": ops}


def main() -> None:
    from resnetlab.export.artifacts import onnx_export
    from resnetlab.export.fold import fold_batchnorm
    from resnetlab.export.quantize import quantize_onnx_int8
    from resnetlab.models import create_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = fold_batchnorm(create_model(args.model).eval())
    shape = model.config.input_size
    x = torch.randn(args.batch, *shape)
    calibration = torch.randn(16, *shape)
    report: dict[str, Any] = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="resnetlab-profile-") as folder:
        fp32 = Path(folder) / "fp32.onnx"
        onnx_export(model, x[:2], fp32)
        paths = {"fp32": fp32}
        for activations in ("int8", "uint8"):
            paths[f"int8, {activations} activations"] = Path(folder) / f"{activations}.onnx"
            quantize_onnx_int8(fp32, paths[f"int8, {activations} activations"], calibration, activations=activations)
        for label, path in paths.items():
            report[label] = profile(path, x, args.runs)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.model}, batch {args.batch}, {report['threads']} threads, ONNX Runtime profiler, ms per run")
    for label in paths:
        print(f"\n{label}: {report[label]['model_run_ms']:.1f} ms per run")
        for op, row in report[label]["ops"].items():
            if row["share"] >= 0.005:
                print(
                    f"  {op:<24} {row['ms_per_run']:9.1f} ms  {100 * row['share']:5.1f}%  {row['nodes_per_run']} nodes"
                )


if __name__ == "__main__":
    main()
