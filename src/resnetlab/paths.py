"""Where resnetlab finds the shared data/weights folder and its caches."""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    """The folder of real data and weights (``RESNETLAB_SHARED``, default ``../shared``)."""
    return Path(os.environ.get("RESNETLAB_SHARED", "../shared")).expanduser()


def cache_dir() -> Path:
    """Where decoded datasets and downloaded weights are cached (``RESNETLAB_CACHE``)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "resnetlab"
    path = Path(os.environ.get("RESNETLAB_CACHE", default)).expanduser()
    return path
