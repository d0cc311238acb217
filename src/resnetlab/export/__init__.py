"""Deployment: BN folding, exports (ONNX, TorchScript, torch.export) with verified metadata, int8."""

from resnetlab.export.artifacts import (
    EXPORT_FORMATS,
    FORMATS,
    ExportedModel,
    export_model,
    is_export,
    load_export,
    max_difference,
    read_export,
)
from resnetlab.export.fold import fold_batchnorm

__all__ = [
    "EXPORT_FORMATS",
    "FORMATS",
    "ExportedModel",
    "export_model",
    "fold_batchnorm",
    "is_export",
    "load_export",
    "max_difference",
    "read_export",
]
