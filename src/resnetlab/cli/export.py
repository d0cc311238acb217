"""``resnetlab export``: ONNX, TorchScript or torch.export artifacts, verified against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from resnetlab.cli.common import add_json_flag, add_model_source, positive_int, print_json, source_options


def register(sub: argparse._SubParsersAction) -> None:
    from resnetlab.export.artifacts import EXPORT_FORMATS  # the one table of formats

    p = sub.add_parser("export",
                       description="Export, then check the artifact against PyTorch on random inputs.")  # fmt: skip
    add_model_source(p)
    p.add_argument("--format", default="onnx", choices=list(EXPORT_FORMATS),
                   help="tflite and coreml need the extras resnetlab[tflite] / resnetlab[coreml]")  # fmt: skip
    p.add_argument("--out", type=Path, help="artifact path (default: model.<ext> in the current folder)")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into convolutions")
    p.add_argument("--quantize", choices=["int8"], help="static int8 quantization (ONNX Runtime)")
    p.add_argument("--calibration-data", help="dataset for int8 calibration (default: the training data)")
    p.add_argument("--calibration-images", type=positive_int, default=256)
    add_json_flag(p)
    p.set_defaults(func=export)


def export(args: argparse.Namespace) -> int:
    """Write the artifact and its .json sidecar; report the largest difference from PyTorch."""
    import torch

    from resnetlab.export import EXPORT_FORMATS, export_model, max_difference, read_export
    from resnetlab.export.quantize import calibration_batch
    from resnetlab.sources import load_resnet

    kind = EXPORT_FORMATS[args.format]
    model = load_resnet(args.source, **source_options(args)).eval()
    out = args.out or Path("model" + kind.suffix)
    calibration = None
    if args.quantize:
        calibration = calibration_batch(model, args.calibration_data, args.calibration_images)
    path = export_model(model, out, args.format, fold_bn=args.fold_bn, quantize=args.quantize,
                        calibration=calibration)  # fmt: skip
    meta = read_export(path)
    c = model.config
    probe = calibration[:8] if calibration is not None else torch.randn(4, c.in_chans, *c.input_size[1:])
    difference = None if kind.not_here else max_difference(model, path, probe)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    report = {"artifact": str(path), "metadata": str(path) + ".json", "format": args.format,
              "max_abs_difference": difference, "bytes": size, "validated": meta.get("validated")}  # fmt: skip
    if args.json:
        print_json(report)
        return 0
    check = f"not run ({kind.not_here})" if difference is None else f"{difference:.2e}"
    print(f"wrote {path} ({size / 1e6:.2f} MB) and {report['metadata']}; max |difference| from PyTorch: {check}")
    if "operations" in (facts := meta.get("validated") or {}):  # a converter that validated its spec (Core ML)
        shapes = lambda named: ", ".join(f"{k} {v}" for k, v in named.items())  # noqa: E731
        print(f"{kind.title} spec validated: {shapes(facts['inputs'])} -> {shapes(facts['outputs'])}, "
              f"{facts['operations']} operations")  # fmt: skip
    return 0
