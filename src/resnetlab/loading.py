"""``load_model(source)``: one way to get a trained model from whatever the user points at.

``source`` may be a run folder (``runs/...``: its ``model/``), a ``save_pretrained`` folder, a training
checkpoint (``checkpoints/last.pt``), a weights file in any supported layout together with a model name,
or a model name (with ``pretrained`` weights or none). Every consumer (eval, predict, export, serve,
features, studies) uses this, so they all accept the same things.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from resnetlab.errors import WeightsError
from resnetlab.models import ResNet, ResNetConfig, create_model, from_pretrained
from resnetlab.models.weights import CONFIG_FILE, load_weights


def load_model(source: str | os.PathLike, *, pretrained: str | bool | None = None, **overrides: Any) -> ResNet:
    path = Path(source)
    if path.is_dir():
        if (path / "model" / CONFIG_FILE).is_file():  # a training run folder
            return from_pretrained(path / "model", **overrides)
        if (path / CONFIG_FILE).is_file():
            return from_pretrained(path, **overrides)
        if (path / "checkpoints" / "last.pt").is_file():
            return _from_training_checkpoint(path / "checkpoints" / "last.pt", overrides)
        raise WeightsError(f"{path} holds neither a model (config.json + model.safetensors) nor a training run")
    if path.is_file():
        return _from_training_checkpoint(path, overrides)
    if isinstance(source, str) and not any(sep in source for sep in ("/", os.sep)) and "." not in source:
        model = create_model(source, pretrained=pretrained, **overrides)
        assert isinstance(model, ResNet)
        return model
    raise WeightsError(f"{source} does not exist (expected a run folder, model folder, checkpoint or model name)")


def _from_training_checkpoint(path: Path, overrides: dict[str, Any]) -> ResNet:
    from resnetlab.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if "model_config" not in state:
        raise WeightsError(f"{path} is a checkpoint without a model description")
    config = ResNetConfig.from_dict(state["model_config"]).replace(**overrides)
    model = ResNet(config, name=state.get("architecture") or "resnet")
    load_weights(model, state["model"], origin=str(path))
    return model
