"""File I/O every part of resnetlab shares: hashing, durable atomic writes, and opening regular files only.

- ``sha256_file`` / ``sha256_bytes``: content hashes recorded beside weights, checkpoints, exports and
  embeddings, and checked before they are used.
- ``write_temporary`` + ``replace_with`` (or ``atomic_write_bytes`` for one file): the data goes to a hidden
  temporary file beside its target, is flushed to disk (fsync), then renamed over the target, and the
  folder is fsynced: readers see the old file or the whole new one, even after a crash or a power cut.
- ``open_regular``: opens a path for reading only when it is a regular file, so a FIFO or a device named
  like an image can never make a reader block forever.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a regular file, read in 1 MiB chunks (``OSError`` for anything else, e.g. a FIFO)."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def error_summary(err: BaseException) -> str:
    """``Type: first line`` of an exception, short enough for a one-line error message.

    Lines about ``weights_only`` are left out: torch's advice to re-run ``torch.load`` with
    ``weights_only=False`` is how a hostile file would run its code, never something to suggest."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(err).__name__}: " + (lines or ["(no details)"])[0][:200]


#: What ``stat`` calls the file types that are not regular files, for error messages.
_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))  # fmt: skip


def file_kind(mode: int) -> str:
    """``"a FIFO (named pipe)"``, ``"a folder"``... for a ``st_mode`` that is not a regular file's."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "a special file")


class NotRegularFileError(OSError):
    """A path names something other than a regular file (a FIFO, a device, a socket, a folder)."""


def _check_regular(mode: int, path: str | os.PathLike) -> None:
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(f"{os.fsdecode(path)} is {file_kind(mode)}, not a regular file")


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for binary reading, refusing anything that is not a regular file.

    The path is checked with ``stat`` first, so a FIFO or a device is never opened; the file is then opened
    non-blocking and checked again with ``fstat`` on the descriptor (a path swapped between the two cannot
    make the open wait for a FIFO's writer). Raises ``FileNotFoundError`` / ``PermissionError`` as ``open``
    does, and ``NotRegularFileError``.
    """
    _check_regular(os.stat(path).st_mode, path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        _check_regular(os.fstat(fd).st_mode, path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def temporary_name(path: Path) -> Path:
    """The hidden name ``path`` is written under before it is renamed into place (``remove_leftovers``)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in a hidden temporary file beside ``path``, flushed to disk; ``replace_with`` puts it in place.

    Raises ``OSError`` (and leaves no temporary file) when the write fails, e.g. on a full disk.
    """
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def fsync_folder(folder: Path) -> None:
    """Make renames in ``folder`` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def replace_with(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` over ``path`` (atomic: readers see the old file or the new one) and make it durable."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    replace_with(write_temporary(path, data), path)


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Like ``atomic_write_bytes`` for a writer that wants a path (``write(tmp)``), e.g. a library's
    ``save_file``: the content never has to be held in memory as one ``bytes``."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    replace_with(tmp, path)


def atomic_write_set(files: dict[Path, bytes]) -> None:
    """Write several files that belong together: all are written and flushed to temporary files first, then
    renamed into place in order. A failure before the renames leaves every old file intact; a crash between
    two renames can leave a mixed set, so callers record a content hash that detects one (see ``features``)."""
    temporaries: list[Path] = []
    try:
        for path, data in files.items():
            temporaries.append(write_temporary(path, data))
        for tmp, path in zip(temporaries, files):
            replace_with(tmp, path)
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)


def remove_leftovers(folder: Path, names: list[str]) -> None:
    """Delete the hidden temporary files that a killed ``write_temporary`` left for the files ``names``."""
    for name in names:
        for leftover in folder.glob(f".{name}.tmp-*"):
            leftover.unlink(missing_ok=True)


def printable_name(name: str | os.PathLike) -> str:
    """A file name as text that can always be printed or written: bytes that are not UTF-8 (kept by Python
    as surrogates) become ``\\xff`` escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def is_utf8_name(name: str | os.PathLike) -> bool:
    """Whether a file name is valid UTF-8 (names that are not cannot be printed, logged or stored as text)."""
    try:
        os.fspath(name).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
