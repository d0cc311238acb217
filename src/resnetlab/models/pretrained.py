"""The ``save_pretrained`` folder: ``model.safetensors`` + ``config.json`` (the Hugging Face layout), written
atomically, and read back only when its recorded digests match (``resnetlab.models.integrity``)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from resnetlab.errors import WeightsError
from resnetlab.io import atomic_write_set, error_summary, open_regular, remove_leftovers, sha256_bytes
from resnetlab.models.integrity import check_pretrained, config_digest
from resnetlab.models.state_dicts import StateDict, load_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
#: A config.json larger than this is not one save_pretrained wrote (class names included).
MAX_CONFIG_BYTES = 16 << 20


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
        check_pretrained(meta, data, config_path, weights)
    return meta, load_safetensors(data, weights)
