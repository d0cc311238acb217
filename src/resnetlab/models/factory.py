"""``create_model``, ``from_pretrained`` and ``model_info``: the front door to the model family.

``published_weights`` (recognising a published file by its sha256) lives in ``resnetlab.models.hub``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.errors import WeightsError
from resnetlab.models.config import ResNetConfig
from resnetlab.models.fit import load_weights
from resnetlab.models.hub import fetch_weights, published_weights, weights_metadata
from resnetlab.models.pretrained import load_pretrained_dir
from resnetlab.models.registry import MODELS, get_config, resolve_name, torchvision_weights
from resnetlab.models.resnet import FeatureExtractor, ResNet
from resnetlab.models.state_dicts import convert_state_dict, load_state_dict_file

PREPROCESSING = ("mean", "std", "input_size", "crop_pct", "interpolation", "label_names")


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike | None = None,
    *,
    features_only: bool = False,
    out_indices: tuple[int, ...] = (1, 2, 3, 4),
    **overrides: Any,
) -> nn.Module:
    """Build a named model, e.g. ``create_model("resnet50", num_classes=10)``.

    ``pretrained``: ``True`` (the model's first published weights), a tag of ``MODELS[name].weights``
    (``"tv_in1k"``, ``"cifar10_akamaster"``, ``"a1_in1k"``, ...), a torchvision weights name
    (``"ResNet50_Weights.IMAGENET1K_V2"``), or a path to a ``save_pretrained`` folder or a weights
    file in any supported layout (torchvision, timm, Hugging Face, akamaster). ``overrides`` are
    ``ResNetConfig`` fields; ``features_only`` returns a ``FeatureExtractor`` for ``out_indices``.
    """
    name = resolve_name(name)
    state_dict, origin, weight_overrides = None, "", {}
    if pretrained:
        state_dict, origin, weight_overrides = _resolve_pretrained(name, pretrained)
    # Preprocessing from the weights applies unless the user overrides it.
    config = get_config(name, **{**weight_overrides, **overrides})
    if state_dict is not None and not weight_overrides and not set(PREPROCESSING) & set(overrides):
        warnings.warn(f"{origin} is not a weights file resnetlab knows (by its sha256), so it carries no "
                      f"preprocessing: assumed {name}'s defaults (input {config.input_size[-1]} px, mean "
                      f"{config.mean}, std {config.std}) and class names 0..{config.num_classes - 1}; pass the "
                      "values it was trained with if they differ", stacklevel=2)  # fmt: skip
    model = ResNet(config, name=name)
    if state_dict is not None:
        load_weights(model, state_dict, origin=origin)
    return FeatureExtractor(model, out_indices) if features_only else model


def _resolve_pretrained(name: str, pretrained: bool | str | os.PathLike) -> tuple[dict, str, dict[str, Any]]:
    entry = MODELS[name]
    if isinstance(pretrained, str) and "_Weights." in pretrained and not Path(pretrained).exists():
        arch, source = torchvision_weights(pretrained)  # torchvision's name, e.g. ResNet50_Weights.IMAGENET1K_V2
        if arch != name:
            raise WeightsError(f"{pretrained} are torchvision's weights for {arch}, not {name}")
        state_dict, extra = fetch_weights(source)
        return state_dict, pretrained, extra
    if pretrained is True or (isinstance(pretrained, str) and pretrained in entry.weights):
        if not entry.weights:
            raise WeightsError(f"no published weights are known for {name}; pass pretrained=PATH to a weights file")
        tag = next(iter(entry.weights)) if pretrained is True else str(pretrained)
        state_dict, extra = fetch_weights(entry.weights[tag])
        return state_dict, f"{name} weights {tag!r}", extra
    path = Path(pretrained)  # type: ignore[arg-type]
    if path.is_dir():
        meta, state_dict = load_pretrained_dir(path)
        saved = meta["config"]
        return state_dict, str(path), {k: saved[k] for k in PREPROCESSING if k in saved}
    if path.is_file():
        known = published_weights(path)
        extra = weights_metadata(known[2]) if known else {}
        return convert_state_dict(load_state_dict_file(path), known[2].format if known else "auto"), str(path), extra
    tags = ", ".join(entry.weights) or "none"
    raise WeightsError(f"pretrained={pretrained!r} is neither a file, a folder nor a weights tag of {name} ({tags})")


def from_pretrained(directory: str | os.PathLike, *, verify: bool = True, **overrides: Any) -> ResNet:
    """Rebuild a model saved with ``save_pretrained`` (architecture, weights and preprocessing).

    The weights are checked against the sha256 in ``config.json``; ``verify=False`` skips that, for a
    folder assembled by hand from files you trust."""
    meta, state_dict = load_pretrained_dir(directory, verify=verify)
    config = ResNetConfig.from_dict(meta["config"]).replace(**overrides)
    try:
        model = ResNet(config, name=str(meta.get("architecture") or "resnet"))
    except (TypeError, ValueError, RuntimeError) as err:  # config.json is untrusted input
        raise WeightsError(f"{directory}/config.json does not describe a buildable model: {err}") from err
    load_weights(model, state_dict, origin=str(directory))
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of one image (multiply-add = 2 FLOPs), by ``torch.utils.flop_counter``.

    For a ``ResNet`` the blocks after the first of each stage all have the same shapes, so one of them is
    counted and multiplied: exact, and fast even for ResNet-1202.
    """
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    skipped = 0
    with counter, torch.no_grad():
        model.eval()
        if not isinstance(model, ResNet) or any(b.lesioned for b in model.blocks()):
            model(x)
            return int(counter.get_total_flops())
        model.check_input(x)
        x = model.forward_stem(x)
        for stage in model.stages:
            x = stage[0](x)
            if len(stage) > 1:
                before = counter.get_total_flops()
                x = stage[1](x)
                skipped += (counter.get_total_flops() - before) * (len(stage) - 2)
        model.forward_head(model.final_act(model.final_norm(x)))
    return int(counter.get_total_flops()) + skipped


def model_info(name: str, input_size: tuple[int, int, int] | None = None, **overrides: Any) -> dict[str, Any]:
    """Facts about a named model: parameters, GMACs (billions of multiply-adds), block type, stages, and its
    preprocessing.

    Built on PyTorch's meta device, so no memory is allocated and even ResNet-1202 is instant.
    """
    name = resolve_name(name)
    with torch.device("meta"):
        model = create_model(name, **overrides)
    assert isinstance(model, ResNet)
    c = model.config
    size = input_size or c.input_size
    h, w = size[1], size[2]
    stages = []
    for info, num_blocks in zip(model.feature_info, (0, *c.layers)):
        stages.append(dict(
            name=info["module"] if num_blocks else f"stem ({c.stem})", blocks=num_blocks,
            channels=info["num_chs"], stride=info["reduction"],
            output=f"{info['num_chs']}x{-(-h // info['reduction'])}x{-(-w // info['reduction'])}",
        ))  # fmt: skip
    entry = MODELS[name]
    return dict(
        name=name,
        description=entry.description,
        paper=entry.paper,
        params=count_params(model),
        reference_params=entry.reference_params,
        params_source=entry.params_source,
        gmacs=count_flops(model, (c.in_chans, h, w)) / 2e9,  # multiply-adds, as torchvision's and timm's "GFLOPS"
        depth=c.depth,
        block=("preact_" if c.preact else "") + c.block,
        shortcut=c.shortcut,
        stem=c.stem,
        input_size=size,
        mean=c.mean,
        std=c.std,
        crop_pct=c.crop_pct,
        num_classes=c.num_classes,
        stages=stages,
        weights=list(entry.weights),
    )
