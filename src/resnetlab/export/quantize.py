"""Static int8 post-training quantization of an ONNX model with ONNX Runtime (QDQ, per-channel weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from resnetlab.errors import ConfigError
from resnetlab.models import ResNet


def quantize_onnx_int8(source: Path, target: Path, calibration: torch.Tensor, batch_size: int = 32) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration.split(batch_size))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch.contiguous().numpy()}

    prepared = source.with_name(source.stem + ".prep.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)  # fmt: skip
    finally:
        prepared.unlink(missing_ok=True)


def calibration_batch(model: ResNet, data: str | None, count: int) -> torch.Tensor:
    """``count`` preprocessed images (seeded draw from the train split of ``data``) for int8 calibration,
    prepared as ``model`` expects them (its input size, mean and std)."""
    from resnetlab.data import build_data

    c = model.config
    if data is None:
        raise ConfigError("int8 quantization needs --calibration-data (a dataset path, e.g. the training data)")
    bundle = build_data(data, augment="none", image_size=c.input_size[-1], mean=c.mean, std=c.std)
    picked = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(0))[:count].tolist()
    return torch.stack([bundle.train[i][0] for i in picked])
