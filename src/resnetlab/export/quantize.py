"""Static int8 post-training quantization of an ONNX model with ONNX Runtime (QDQ, per-channel weights).

Activations are unsigned (uint8) by default: ONNX Runtime's x86 int8 kernels multiply uint8 activations by
int8 weights (VNNI's u8 x s8 instruction, AMX); with int8 activations the convolutions do not run as
integer kernels (see the profile in docs/results/deployment.md) and int8 is no faster than fp32."""

from __future__ import annotations

from pathlib import Path

import torch

from resnetlab.errors import ConfigError
from resnetlab.models import ResNet


def quantize_onnx_int8(source: Path, target: Path, calibration: torch.Tensor, batch_size: int = 32, *,
                       activations: str = "uint8") -> None:  # fmt: skip
    """Quantize ``source`` into ``target``, calibrated on ``calibration`` (preprocessed images);
    ``activations``: ``uint8`` (fast on x86) or ``int8``."""
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
                        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, reduce_range=False)  # fmt: skip
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
