"""Mobile formats: Core ML (coremltools) and TensorFlow Lite (litert-torch), as optional extras.

Core ML conversion runs on Linux, but running an ``.mlpackage`` needs macOS, so here the converted
program is validated structurally (input/output shapes, operation count). TFLite models run anywhere
through ``ai_edge_litert``, so they are checked numerically against PyTorch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from resnetlab.errors import ConfigError
from resnetlab.models import ResNet


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{module} is not installed: pip install 'resnetlab[{extra}]' ({err})") from err


def to_coreml(model: ResNet, path: str | os.PathLike, *, batch: int = 1) -> dict[str, Any]:
    """Convert to a Core ML program (``.mlpackage``); returns the validated spec facts."""
    ct = _require("coremltools", "coreml")
    c = model.config
    example = torch.zeros(batch, c.in_chans, *c.input_size[1:])
    traced = torch.jit.trace(model.eval(), example)
    converted = ct.convert(traced, inputs=[ct.TensorType(name="input", shape=tuple(example.shape))],
                           outputs=[ct.TensorType(name="logits")], convert_to="mlprogram")  # fmt: skip
    converted.save(str(path))
    spec = converted.get_spec()
    operations = sum(len(block.operations) for function in spec.mlProgram.functions.values()
                     for block in function.block_specializations.values())  # fmt: skip
    shape = lambda feature: [int(d) for d in feature.type.multiArrayType.shape]  # noqa: E731
    return {"path": str(path), "inputs": {f.name: shape(f) for f in spec.description.input},
            "outputs": {f.name: shape(f) for f in spec.description.output}, "operations": operations}  # fmt: skip


def to_tflite(model: ResNet, path: str | os.PathLike, *, batch: int = 1) -> dict[str, Any]:
    """Convert to ``.tflite`` with litert-torch and compare its output with PyTorch's."""
    litert_torch = _require("litert_torch", "tflite")
    c = model.config
    example = torch.randn(batch, c.in_chans, *c.input_size[1:])
    edge = litert_torch.convert(model.eval(), (example,))
    edge.export(str(path))
    with torch.no_grad():
        difference = float(abs(torch.as_tensor(edge(example)) - model(example)).max())
    return {"path": str(path), "bytes": Path(path).stat().st_size, "input_shape": list(example.shape),
            "max_abs_difference": difference}  # fmt: skip
