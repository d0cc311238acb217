"""Integrity: weights are checked against a sha256 before their tensors are used.

- ``save_pretrained`` records the sha256 of ``model.safetensors`` in ``config.json``, and ``config_digest``
  binds the architecture and config to it; ``check_pretrained`` refuses a folder where either no longer
  matches (a truncated, damaged or swapped file, a config edited beside valid weights);
- published weights carry a sha256 prefix in the registry: ``check_published`` refuses a file (found in a
  weights folder or downloaded) whose digest does not start with it, and the same digests recognise a
  published file given by path (``resnetlab.models.hub.published_weights``);
- ``file_sha256``: a file's digest, computed once per version of the file in a process, so that recognising
  a file and then loading it does not read it through twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from resnetlab.errors import WeightsError
from resnetlab.io import open_regular, sha256_bytes

#: A file whose last change (ctime) is at least this much older than the start of its hashing keeps its
#: digest: any later write, or a modification time set back, gives it a later ctime, which no one can set
#: (git's index trusts file times by the same "racily clean" rule).
SETTLED_NS = 2_000_000_000
_DIGESTS: dict[tuple[int, ...], str] = {}


def _version(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a regular file, hashed once while the file stays as it was (same device, inode, size,
    modification and change times). A file changed less than ``SETTLED_NS`` before it was hashed, or while it
    was hashed, is hashed again on its next use."""
    started = time.time_ns()
    with open_regular(path) as f:
        before = _version(os.fstat(f.fileno()))
        if before in _DIGESTS:
            return _DIGESTS[before]
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        after = _version(os.fstat(f.fileno()))
    if before == after and before[-1] < started - SETTLED_NS:  # ctime
        _DIGESTS[before] = digest.hexdigest()
    return digest.hexdigest()


def check_published(path: Path, source: Any) -> None:
    """Refuse a published weights file (``source``: a ``registry.WeightsSource``) that is not the published one."""
    if source.sha256_prefix and not file_sha256(path).startswith(source.sha256_prefix):
        raise WeightsError(f"{path} is corrupt: its sha256 does not start with {source.sha256_prefix}")


def config_digest(meta: dict[str, Any]) -> str:
    """sha256 binding a model folder's architecture and config to its weights' sha256.

    Recorded as ``config_sha256`` in ``config.json``: a config edited beside valid weights (say
    ``layers: [1000000, 3, 3]``) no longer matches and is refused before any model is built."""
    bound = {k: meta.get(k) for k in ("architecture", "config", "weights_sha256")}
    return sha256_bytes(json.dumps(bound, sort_keys=True, separators=(",", ":")).encode())


def check_pretrained(meta: dict[str, Any], data: bytes, config_path: Path, weights: Path) -> None:
    """Refuse a ``save_pretrained`` folder whose weights (``data``, as read) or config no longer match
    ``config.json``'s ``weights_sha256`` and ``config_sha256`` (folders saved before resnetlab recorded
    ``config_sha256`` have none to check)."""
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
