"""Weights files are hashed once per load, and a file that is not the published one is refused.

Recognising a published file given by path (``resolve_source``) and loading it (``create_model``) both ask
for its sha256: the digest is remembered while the file stays as it was (``integrity.file_sha256``), so it
is read through once, and a file changed in place (even with its modification time set back) is hashed again.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import resnetlab
from resnetlab.data import CIFAR10_CLASSES
from resnetlab.errors import WeightsError
from resnetlab.models import hub, integrity
from resnetlab.models.registry import WeightsSource
from resnetlab.sources import resolve_source

LONG_AGO = time.time() - 86400


@pytest.fixture(scope="module")
def settled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """resnet8 weights files whose last change is older than ``SETTLED_NS`` (so their digests are kept)."""
    folder = tmp_path_factory.mktemp("settled")
    files = {}
    for name in ("by-path", "in-folder"):
        torch.manual_seed(0)
        files[name] = folder / name / f"resnet8-{name}.pth"
        files[name].parent.mkdir()
        torch.save(resnetlab.create_model("resnet8").state_dict(), files[name])
        os.utime(files[name], (LONG_AGO, LONG_AGO))
    time.sleep(integrity.SETTLED_NS / 1e9 + 0.1)
    return files


def _published(path: Path) -> WeightsSource:
    """``path`` as published weights of resnet8 (CIFAR-10 classes), known by the sha256 of its content now."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return WeightsSource("url", f"https://weights.invalid/{path.name}", "resnetlab", path.name,
                         sha256_prefix=digest[:8], labels="cifar-10")  # fmt: skip


def _tamper(path: Path) -> None:
    """Flip one byte in place, and set the modification time back: same inode, size and mtime."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(path, (LONG_AGO, LONG_AGO))


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per file ``file_sha256`` reads through (no digest remembered before the test)."""
    monkeypatch.setattr(integrity, "_DIGESTS", {})
    made: list[int] = []

    def sha256():
        made.append(1)
        return hashlib.sha256()

    monkeypatch.setattr(integrity, "hashlib", SimpleNamespace(sha256=sha256))
    return made


def test_a_published_file_given_by_path_is_hashed_once(settled, hashes, monkeypatch) -> None:
    path = settled["by-path"]
    source = _published(path)
    monkeypatch.setattr(hub, "MODELS", {"resnet8": SimpleNamespace(weights={"mine": source})})
    resolved = resolve_source(path)
    assert (resolved.kind, resolved.name, resolved.weights) == ("published", "resnet8", "mine")
    model = resolved.load()
    assert model.config.label_names == CIFAR10_CLASSES  # what the registry says of it
    assert len(hashes) == 1  # recognised, then loaded: read through once
    _tamper(path)
    assert resolve_source(path, model="resnet8").kind == "weights"  # no longer the published file
    assert len(hashes) == 2  # hashed again: its change time moved, whatever its modification time says


def test_a_published_file_changed_in_place_is_refused(settled, hashes, monkeypatch) -> None:
    path = settled["in-folder"]
    source = _published(path)
    monkeypatch.setenv("RESNETLAB_WEIGHTS_PATH", str(path.parent))  # found there instead of downloaded
    state_dict, extra = hub.fetch_weights(source)
    assert len(hashes) == 1
    assert set(state_dict) == set(resnetlab.create_model("resnet8").state_dict())
    assert extra["label_names"] == CIFAR10_CLASSES
    _tamper(path)
    with pytest.raises(WeightsError, match="is corrupt: its sha256 does not start with"):
        hub.fetch_weights(source)
