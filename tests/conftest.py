"""Shared test fixtures.

Tests that need the real data or weights in ``../shared`` use the ``shared_file`` fixture: on a
user's machine a missing file skips the test with the reason; with ``CI=true`` it fails the run.
"""

from __future__ import annotations

import os
from pathlib import Path

# OpenMP threads that spin-wait for each other make every op 5-10x slower when the cores are shared
# (the tests start training subprocesses and torchrun workers beside this one). Must precede `import torch`;
# subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from resnetlab.paths import shared_dir

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def skip_or_fail(message: str, what: str) -> None:
    """Skips the test with ``message`` on a user's machine; with ``CI=true``, fails it (``what`` is missing)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {what} is missing: {message}")
    pytest.skip(message)


def _require_shared(relative: str) -> Path:
    path = shared_dir() / relative
    if not path.exists():
        skip_or_fail(f"needs {path} (set RESNETLAB_SHARED to the shared data folder)", "the shared file")
    return path


@pytest.fixture(scope="session")
def shared_file():
    """``shared_file("data/hymenoptera.zip")`` -> Path, or skip/fail as above."""
    return _require_shared


@pytest.fixture(autouse=True)
def _outputs_stay_in_tmp_path():
    """A test writes into ``tmp_path``, never into the directory pytest runs from: ``resnetlab predict`` on a
    folder writes ``predictions.csv`` into the current directory, so a test of that default must first
    ``monkeypatch.chdir(tmp_path)``. A predictions CSV left behind fails the test that wrote it."""
    here = Path.cwd()
    before = set(here.glob("predictions*.csv"))
    yield
    left = sorted(p.name for p in set(here.glob("predictions*.csv")) - before)
    assert not left, f"the test wrote {left} into {here}: write into tmp_path (or chdir there first)"
