"""Decode small-image datasets once into uint8 tensors, cached as safetensors (never pickle).

The cache file lives under ``resnetlab.paths.cache_dir()/datasets`` and is keyed by the source's path,
size and modification time (for a folder: of every file in it), so editing the source invalidates it.
Writes are atomic (``resnetlab.io``: temporary file, fsync, rename): an interrupted run never leaves a
half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from resnetlab.data.images import load_image
from resnetlab.data.stores import FileStore
from resnetlab.errors import DataError
from resnetlab.io import atomic_write_with
from resnetlab.paths import cache_dir

CACHE_VERSION = 1


def cache_file_for(source: Path, *, tag: str = "") -> Path:
    """The cache path for ``source`` (a file or folder) and a variant ``tag`` (e.g. the image mode)."""
    source = source.expanduser().resolve()
    digest = hashlib.sha256(os.fsencode(f"v{CACHE_VERSION}|{source}|{tag}"))
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    for path in files:  # (os.fsencode: a file name need not be valid UTF-8)
        st = path.stat()
        digest.update(os.fsencode(f"|{path.relative_to(source.parent)}|{st.st_size}|{st.st_mtime_ns}"))
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name)[:60]
    return cache_dir() / "datasets" / f"{stem}-{digest.hexdigest()[:16]}.safetensors"


def save_cache(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write atomically; an unwritable cache folder only costs a warning (decoding happens again)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata={"resnetlab": json.dumps(metadata)}))
    except OSError as err:
        warnings.warn(f"could not write the dataset cache {path} ({err}); it will be decoded again", stacklevel=2)


def load_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``(tensors, metadata)``, or None when there is no usable cache file."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {})["resnetlab"])
        return load_file(str(path)), metadata
    except (OSError, SafetensorError, KeyError, ValueError) as err:
        warnings.warn(f"ignoring unreadable dataset cache {path} ({err})", stacklevel=2)
        return None


def decode_all(store: FileStore, samples: list[tuple[str, int]], mode: str = "RGB",
               ) -> tuple[np.ndarray, np.ndarray, list[str]] | None:  # fmt: skip
    """Decode every sample into ``(images uint8 (N,C,H,W), targets int64, skipped)``.

    Files that fail to decode are skipped (and listed); returns None if the images differ in size,
    since they then cannot share one tensor (the caller falls back to lazy decoding).
    """
    images: np.ndarray | None = None
    targets = np.empty(len(samples), dtype=np.int64)
    skipped: list[str] = []
    count = 0
    for name, target in samples:
        try:
            with store.open(name) as stream:
                pixels = np.asarray(load_image(stream, mode, name=store.describe(name)))
        except DataError as err:
            skipped.append(f"{name} ({err})")
            continue
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        if images is None:
            images = np.empty((len(samples), *pixels.shape), dtype=np.uint8)
        elif pixels.shape != images.shape[1:]:
            return None
        images[count], targets[count] = pixels, target
        count += 1
    if images is None:
        raise DataError(f"none of the {len(samples)} images could be decoded: {'; '.join(skipped[:5])}")
    return np.ascontiguousarray(images[:count].transpose(0, 3, 1, 2)), targets[:count], skipped
