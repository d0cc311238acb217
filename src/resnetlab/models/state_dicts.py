"""State dicts from files, and from other libraries' layouts to resnetlab's.

Reading (``load_state_dict_file``): ``.safetensors``, or ``torch.load(weights_only=True)``; nothing here
unpickles code.

Formats understood (``convert_state_dict(sd, source)``; ``source="auto"`` detects from the keys):

- ``resnetlab`` / ``torchvision`` / ``timm`` (resnet*): our layout is theirs, keys map one to one;
- ``timm_v2``: timm's pre-activation ResNetV2 (``stem.conv``, ``stages.i.blocks.j``, ``head.fc``);
- ``timm_sk``: timm's selective-kernel ResNets (their second conv is a ``conv2.conv``/``conv2.bn`` pair);
- ``hf``: Hugging Face transformers ``ResNetModel`` / ``ResNetForImageClassification``;
- ``akamaster``: the published CIFAR ResNets (``module.`` prefix, ``linear`` head);
- torchvision detection checkpoints (``backbone.body.`` prefix) yield their backbone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from resnetlab.errors import WeightsError
from resnetlab.io import error_summary

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------- reading files
def load_state_dict_file(path: str | os.PathLike) -> StateDict:
    """Tensors from a ``.safetensors`` file or a PyTorch checkpoint, never executing pickled code.

    Checkpoints that wrap the tensors (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_safetensors(path, path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise WeightsError(
            f"cannot load {path} as plain tensors ({error_summary(err)}). "
            "resnetlab never unpickles code; re-save it with torch.save(model.state_dict(), ...) or as "
            "safetensors if it comes from a source you trust"
        ) from err
    return unwrap_state_dict(obj, path)


def load_safetensors(source: Path | bytes, origin: Path) -> StateDict:
    """Tensors from a safetensors file (memory-mapped) or from its bytes (what was verified is what loads)."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        return load(source) if isinstance(source, bytes) else load_file(str(source))
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as err:
        raise WeightsError(f"{origin} is not a readable safetensors file ({error_summary(err)})") from err


def unwrap_state_dict(obj: Any, origin: object = "checkpoint") -> StateDict:
    for key in ("state_dict", "model_state_dict", "model", "module", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{origin} holds no state dict of tensors")
    return dict(obj)


# ---------------------------------------------------------------------------- converters
def _strip_prefixes(sd: StateDict, prefixes: tuple[str, ...]) -> StateDict:
    for prefix in prefixes:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _rename(sd: StateDict, rules: list[tuple[str, str]]) -> StateDict:
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _stage_index_plus_one(match: re.Match[str]) -> str:
    return f"layer{int(match.group(1)) + 1}.{match.group(2)}."


def from_timm_v2(sd: StateDict) -> StateDict:
    """timm ResNetV2 (pre-activation) -> resnetlab."""
    sd = _rename(sd, [
        (r"^stem\.conv\.", "conv1."),
        (r"^stem\.conv1\.", "conv1.0."), (r"^stem\.norm1\.", "conv1.1."),
        (r"^stem\.conv2\.", "conv1.3."), (r"^stem\.norm2\.", "conv1.4."), (r"^stem\.conv3\.", "conv1.6."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.", _stage_index_plus_one),  # type: ignore[list-item]
        (r"\.norm(\d)\.", r".bn\1."), (r"\.downsample\.conv\.", ".downsample.0."),
        (r"^norm\.", "final_norm."), (r"^head\.fc\.", "fc."),
    ])  # fmt: skip
    if "fc.weight" in sd and sd["fc.weight"].ndim == 4:  # timm's 1x1-conv head
        sd["fc.weight"] = sd["fc.weight"].flatten(1)
    return sd


def from_timm_sk(sd: StateDict) -> StateDict:
    """timm SKNet (``conv2.conv``/``conv2.bn`` conv-norm pairs) -> resnetlab (``conv2``/``bn2``)."""
    return _rename(sd, [(r"\.conv(\d)\.conv\.", r".conv\1."), (r"\.conv(\d)\.bn\.", r".bn\1.")])


def from_hf(sd: StateDict) -> StateDict:
    """Hugging Face transformers ResNet -> resnetlab."""
    return _rename(sd, [
        (r"^resnet\.", ""),
        (r"^embedder\.embedder\.convolution\.", "conv1."),
        (r"^embedder\.embedder\.normalization\.", "bn1."),
        (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", _stage_index_plus_one),  # type: ignore[list-item]
        (r"\.shortcut\.convolution\.", ".downsample.0."), (r"\.shortcut\.normalization\.", ".downsample.1."),
        (r"\.layer\.(\d)\.convolution\.", lambda m: f".conv{int(m.group(1)) + 1}."),  # type: ignore[list-item]
        (r"\.layer\.(\d)\.normalization\.", lambda m: f".bn{int(m.group(1)) + 1}."),  # type: ignore[list-item]
        (r"^classifier\.1\.", "fc."),
    ])  # fmt: skip


def from_akamaster(sd: StateDict) -> StateDict:
    """akamaster/pytorch_resnet_cifar10 -> resnetlab (``module.`` prefix, ``linear`` head)."""
    return _rename(sd, [(r"^linear\.", "fc.")])


def identity(sd: StateDict) -> StateDict:
    return sd


CONVERTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "resnetlab": identity, "torchvision": identity, "timm": identity,
    "timm_v2": from_timm_v2, "timm_sk": from_timm_sk, "hf": from_hf, "akamaster": from_akamaster,
}  # fmt: skip


def detect_format(sd: StateDict) -> str:
    keys = list(sd)
    if any("embedder.embedder" in k for k in keys):
        return "hf"
    if any(k.startswith("stages.") and ".blocks." in k for k in keys):
        return "timm_v2"
    if any(".conv2.conv." in k for k in keys):
        return "timm_sk"
    if "linear.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "akamaster"
    return "resnetlab"


def convert_state_dict(sd: StateDict, source: str = "auto") -> StateDict:
    """Map a state dict from ``source``'s naming to resnetlab's (which is torchvision's)."""
    sd = _strip_prefixes(sd, ("module.", "_orig_mod.", "model.", "backbone.body."))
    if any(k.startswith("backbone.body.") for k in sd):  # detection checkpoint: keep the backbone
        sd = {k.removeprefix("backbone.body."): v for k, v in sd.items() if k.startswith("backbone.body.")}
    source = detect_format(sd) if source == "auto" else source
    if source not in CONVERTERS:
        raise WeightsError(f"unknown weights format {source!r}; choose one of {sorted(CONVERTERS)}")
    return CONVERTERS[source](sd)
