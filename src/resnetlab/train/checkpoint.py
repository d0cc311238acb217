"""Training checkpoints: atomic, self-verifying, and loadable without unpickling code.

A checkpoint file holds ``{"payload": uint8 tensor, "sha256": str}``; the payload is the ``torch.save``
of the training state (tensors, numbers, strings, lists and dicts only). Writing goes to a temporary file
in the same folder, is flushed to disk, then renamed over the old file: a run killed at any moment, or a
full disk, leaves the previous checkpoint intact. Loading refuses a truncated or altered file by name.
"""

from __future__ import annotations

import errno
import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnetlab.errors import ResNetLabError, WeightsError
from resnetlab.io import atomic_write_bytes, error_summary, sha256_bytes


class CheckpointError(ResNetLabError):
    """A checkpoint could not be written (the previous one is kept)."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> str:
    """Atomically write ``state``; returns its sha256."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = sha256_bytes(payload)
    wrapped = io.BytesIO()
    torch.save({"payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8), "sha256": digest}, wrapped)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_bytes(path, wrapped.getvalue())
    except OSError as err:
        hint = " (the disk is full)" if err.errno == errno.ENOSPC else ""
        raise CheckpointError(f"could not write {path}{hint}: {err}; the previous file is intact") from err
    return digest


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint written by ``save_checkpoint``.

    Every failure is a ``WeightsError`` naming the file: missing, truncated, altered (sha256 mismatch),
    not a resnetlab checkpoint, or holding anything but plain data (a pickle that would run code is
    refused by ``weights_only`` loading before anything in it runs).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise WeightsError(
            f"{path} is truncated, corrupt or not a resnetlab training checkpoint ({error_summary(err)})"
        ) from err
    payload = outer.get("payload") if isinstance(outer, dict) else None
    digest = outer.get("sha256") if isinstance(outer, dict) else None
    if not (
        isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and payload.dim() == 1
        and payload.layout == torch.strided and isinstance(digest, str)
    ):  # fmt: skip
        raise WeightsError(
            f"{path} is not a resnetlab training checkpoint (no verified payload); "
            "for a plain weights file pass it as pretrained=PATH instead"
        )
    data = payload.detach().contiguous().numpy().tobytes()
    if sha256_bytes(data) != digest:
        raise WeightsError(f"{path} is corrupt: its content does not match its sha256")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(
            f"{path} holds more than plain tensors and values ({error_summary(err)}); resnetlab never unpickles "
            "code, so it was refused and nothing in it ran"
        ) from err
    if not isinstance(state, dict):
        raise WeightsError(f"{path} is not a resnetlab training checkpoint: its state is a {type(state).__name__}")
    return state


def rng_state() -> dict[str, Any]:
    """Every random generator a run draws from, as tensors and plain values."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": [*internal, gauss],
        "python_version": version,
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((state["python_version"], tuple(python[:-1]), python[-1]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
