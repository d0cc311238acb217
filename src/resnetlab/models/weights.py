"""Weights: read checkpoints safely, convert other libraries' layouts, adapt heads and inputs, and the
``save_pretrained`` folder layout. Hashing and atomic writes are ``resnetlab.io``'s; published weights
(download, class names) are ``resnetlab.models.hub``'s.

Formats understood (``convert_state_dict(sd, source)``; ``source="auto"`` detects from the keys):

- ``resnetlab`` / ``torchvision`` / ``timm`` (resnet*): our layout is theirs, keys map one to one;
- ``timm_v2``: timm's pre-activation ResNetV2 (``stem.conv``, ``stages.i.blocks.j``, ``head.fc``);
- ``timm_sk``: timm's selective-kernel ResNets (their second conv is a ``conv2.conv``/``conv2.bn`` pair);
- ``hf``: Hugging Face transformers ``ResNetModel`` / ``ResNetForImageClassification``;
- ``akamaster``: the published CIFAR ResNets (``module.`` prefix, ``linear`` head);
- torchvision detection checkpoints (``backbone.body.`` prefix) yield their backbone.

Nothing here unpickles code: ``.safetensors`` or ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.errors import WeightsError
from resnetlab.io import atomic_write_set, error_summary, open_regular, remove_leftovers, sha256_bytes

StateDict = dict[str, torch.Tensor]
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
#: A config.json larger than this is not one save_pretrained wrote (class names included).
MAX_CONFIG_BYTES = 16 << 20


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


# ---------------------------------------------------------------------------- loading into a model
def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv weight (O, C, k, k) to ``in_chans`` inputs.

    One channel: sum over the colour channels (a grey image is R=G=B). N channels: repeat the filters
    cyclically and rescale by C/N so activations keep their magnitude.
    """
    src = weight.shape[1]
    if in_chans == src:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // src)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (src / in_chans)


def first_conv_key(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{name}.weight"
    raise WeightsError("model has no convolution")


def load_weights(model: nn.Module, sd: StateDict, *, origin: str = "checkpoint", strict: bool = True) -> None:
    """Load converted weights, adapting what can be adapted and explaining what cannot.

    - a head for another number of classes is dropped (the model keeps its fresh head), with a warning;
    - a first conv for another number of input channels is adapted (``adapt_input_conv``);
    - any other shape mismatch, missing or unexpected key raises ``WeightsError`` naming the tensors.
    """
    own = model.state_dict()
    sd = dict(sd)
    head_keys = [k for k in ("fc.weight", "fc.bias") if k in sd]
    if head_keys and ("fc.weight" not in own or own["fc.weight"].shape != sd["fc.weight"].shape):
        classes = sd["fc.weight"].shape[0]
        warnings.warn(
            f"{origin}: classifier for {classes} classes does not fit this model's head; "
            "the head is re-initialised (fine-tune it)",
            stacklevel=2,
        )
        for k in head_keys:
            del sd[k]
    conv_key = first_conv_key(model)
    if conv_key in sd and conv_key in own and sd[conv_key].shape[1] != own[conv_key].shape[1]:
        sd[conv_key] = adapt_input_conv(sd[conv_key], own[conv_key].shape[1])
    mismatched = [  # in the model's order, so the first message names the first layer that differs
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if mismatched:
        raise WeightsError(
            f"{origin} does not fit {getattr(model, 'name', type(model).__name__)}: "
            + "; ".join(mismatched[:5]) + (f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else "")
            + ". Is it a checkpoint of another architecture?"
        )  # fmt: skip
    own_extra = {k for k in own if k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in sd and k not in own_extra and not k.startswith("fc.")]
    unexpected = [k for k in sd if k not in own and not k.endswith("num_batches_tracked")]
    if strict and (missing or unexpected):
        raise WeightsError(
            f"{origin} does not match {getattr(model, 'name', type(model).__name__)}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
            "Is it a checkpoint of another architecture or depth?"
        )
    model.load_state_dict(sd, strict=False)


# ---------------------------------------------------------------------------- save_pretrained layout
def config_digest(meta: dict[str, Any]) -> str:
    """sha256 binding a model folder's architecture and config to its weights' sha256.

    Recorded as ``config_sha256`` in ``config.json``: a config edited beside valid weights (say
    ``layers: [1000000, 3, 3]``) no longer matches and is refused before any model is built."""
    bound = {k: meta.get(k) for k in ("architecture", "config", "weights_sha256")}
    return sha256_bytes(json.dumps(bound, sort_keys=True, separators=(",", ":")).encode())


def save_pretrained(model: nn.Module, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (the Hugging Face layout) into ``directory``.

    ``config.json`` records the sha256 of the weights and ``config_sha256`` (``config_digest``). Both files
    are written and flushed to temporary files first, then renamed into place one after the other: a crash
    or a full disk leaves the previous folder intact (or, in the instant between the two renames, a folder
    that is refused as inconsistent, never one that loads wrong weights).
    """
    from safetensors.torch import save

    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    weights = save(tensors, metadata={"format": "pt"})
    meta = {
        "resnetlab_format": FORMAT_VERSION,
        "architecture": getattr(model, "name", None),
        "config": model.config.to_dict(),  # type: ignore[union-attr]
        "weights_sha256": sha256_bytes(weights),
        **(extra or {}),
    }
    meta["config_sha256"] = config_digest(meta)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_leftovers(directory, [WEIGHTS_FILE, CONFIG_FILE])  # of an earlier save that was killed
        atomic_write_set({directory / WEIGHTS_FILE: weights,
                          directory / CONFIG_FILE: json.dumps(meta, indent=2).encode()})  # fmt: skip
    except OSError as err:
        hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
        raise WeightsError(
            f"could not save the model to {directory}{hint}: {err}; the previous files are intact"
        ) from err
    return directory


def read_pretrained_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    try:
        with open_regular(path) as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise WeightsError(
                f"{path} is larger than {MAX_CONFIG_BYTES} bytes: not a config.json save_pretrained wrote"
            )
        meta = json.loads(text)
    except FileNotFoundError:
        raise WeightsError(f"{directory} is not a resnetlab model folder: {CONFIG_FILE} is missing") from None
    except OSError as err:
        raise WeightsError(f"cannot read {path}: {err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise WeightsError(f"{path} is not valid JSON ({error_summary(err)}); it is truncated or corrupt") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise WeightsError(f"{path} has no 'config' entry: not written by save_pretrained")
    return meta


def load_pretrained_dir(directory: str | os.PathLike, verify: bool = True) -> tuple[dict[str, Any], StateDict]:
    """``config.json`` and the tensors of a ``save_pretrained`` folder.

    With ``verify=True`` (the default) the weights must match the sha256 recorded in ``config.json``
    (a folder without one is refused), and the config must match its ``config_sha256``. Folders saved
    before resnetlab recorded ``config_sha256`` are accepted: their config is still checked against
    ``ResNetConfig``'s size bounds before anything is built. ``verify=False`` is for folders you assembled
    yourself from files you trust: nothing then detects a truncated, damaged or swapped file.
    """
    meta = read_pretrained_config(directory)
    config_path, weights = Path(directory) / CONFIG_FILE, Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(f"{weights} is missing: the model folder is incomplete (re-save it with save_pretrained)")
    data = weights.read_bytes()
    if verify:
        expected = meta.get("weights_sha256")
        if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise WeightsError(
                f"{config_path} records no valid 'weights_sha256', so {weights} cannot be verified. "
                "Re-save the model with resnetlab.save_pretrained; for a folder you assembled yourself from "
                "files you trust, load it with from_pretrained(folder, verify=False)"
            )
        if sha256_bytes(data) != expected:
            raise WeightsError(
                f"{weights} is corrupt or was modified (truncated, damaged, or a save was interrupted): "
                f"its sha256 differs from the one recorded in {config_path}"
            )
        if "config_sha256" in meta and meta["config_sha256"] != config_digest(meta):
            raise WeightsError(
                f"{config_path} was modified after the model was saved: its architecture or config no longer "
                "matches its 'config_sha256'. Re-save the model with resnetlab.save_pretrained"
            )
    return meta, load_safetensors(data, weights)
