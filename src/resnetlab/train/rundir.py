"""``RunDir``: the one owner of a training run folder's layout, and the lock a run holds while it writes.

A run folder holds ``config.yaml``, ``log.txt``, ``metrics.csv``, ``curves.png``, ``tensorboard/``,
``checkpoints/last.pt`` (and ``best.pt``), ``model/`` (the kept weights) and ``eval/``. Every other
module asks a ``RunDir`` for these paths instead of spelling them. A run refuses a folder another run
already used unless it resumes it or is told to overwrite it, and holds an exclusive ``flock`` on
``.lock`` while it writes: a second run into the same folder is refused by name, and the lock dies with
its process (a ``kill -9`` leaves no stale lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from resnetlab.errors import ConfigError, ResNetLabError


class RunDirBusy(ResNetLabError):
    """Another process is writing this run folder."""


#: What a run writes, relative to its folder: what ``--overwrite`` removes (nothing else is touched).
OUTPUTS = ("checkpoints", "model", "eval", "tensorboard", "metrics.csv", "curves.png", "config.yaml", "log.txt")


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder (``path``), and the operations on it as a whole."""

    path: Path

    @classmethod
    def new(cls, runs_root: str | os.PathLike, model: str, data: str | None) -> RunDir:
        """A fresh ``<runs_root>/<time>-<model>-<data>`` folder name (suffixed ``-2``, ... when taken)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{model}-{Path(data).name.split('.')[0] if data else 'digits'}"
        path, suffix = Path(runs_root) / name, 1
        while path.exists():
            suffix += 1
            path = Path(runs_root) / f"{name}-{suffix}"
        return cls(path)

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir:
        """The run folder a ``checkpoints/<name>.pt`` file belongs to."""
        return cls(checkpoint.parent.parent)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, name: str = "last") -> Path:
        """``checkpoints/<name>.pt``: ``last`` (resume from it) or ``best`` (best on the val split)."""
        return self.checkpoints / f"{name}.pt"

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    @property
    def model(self) -> Path:
        """The kept weights as a ``save_pretrained`` folder."""
        return self.path / "model"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log(self) -> Path:
        return self.path / "log.txt"

    @property
    def eval(self) -> Path:
        """Where ``resnetlab eval`` of this run (or of one of its checkpoints) writes its reports."""
        return self.path / "eval"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    def is_run(self) -> bool:
        """Whether this folder holds a run's outputs: a checkpoint, a model or metrics (a run that failed
        before its first step leaves none of these, and its folder can be used again)."""
        return self.last.exists() or self.best.exists() or self.model.exists() or self.metrics.exists()

    def claim(self, *, overwrite: bool) -> None:
        """Make the folder ready for a new run: refuse one that holds another run's outputs, unless
        ``overwrite`` (then those outputs, and only those, are removed). Call it holding ``lock()``."""
        if not self.is_run():
            return
        if not overwrite:
            raise ConfigError(
                f"{self.path} already holds a run; continue it with `resnetlab train --resume {self.path}`, "
                f"replace it with --overwrite, or choose another --run-dir"
            )
        for name in OUTPUTS:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()

    def remove_stale_temporaries(self) -> None:
        """Temporary files of checkpoint writes that a killed run left behind."""
        for stale in self.checkpoints.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder (created if needed) while the block runs; a
        ``RunDirBusy`` naming the holder's pid when another process holds it."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--run-dir {self.path} is a file, not a folder; choose another --run-dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle: IO[str] = open(self.lock_file, "a+")  # noqa: SIM115 - held open until the block ends
        except OSError as err:
            raise ConfigError(f"cannot write the run folder {self.path}: {err.strerror or err}; choose another "
                              "--run-dir") from None  # fmt: skip
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise RunDirBusy(
                    f"{self.path} is being written by another training run (pid {holder}); wait for it to end, "
                    "or choose another --run-dir"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            handle.close()  # releases the lock
