"""Read-only file stores: a directory or an archive (.zip, .tar, .tar.gz, .tar.xz, .tar.bz2).

Archives are read in place and never extracted, so nothing can be written anywhere. Members with absolute
paths or ``..`` components make the whole archive refused (it is malformed or hostile); links and device
entries are ignored with a warning and never followed. Sizes are checked before anything is read: a
member declaring more than ``MAX_MEMBER_BYTES``, or a compressed tar whose members add up to more than
``MAX_IN_MEMORY_BYTES``, is refused (decompression bombs); a zip member is never read past its declared
size, and one whose content does not match it fails its CRC check. In a directory, symlinks that lead outside the
root are skipped with a warning unless ``follow_symlinks=True``; only regular files are listed and opened (a
FIFO named ``p.png`` would block a reader forever), and names that are not valid UTF-8 are left out (they
cannot be reported or stored); both are listed in the store's ``skipped`` with the reason.
"""

from __future__ import annotations

import io
import lzma
import os
import stat
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from resnetlab.errors import DataError
from resnetlab.io import file_kind, is_utf8_name, open_regular, printable_name

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tbz")
#: A single member larger than this is refused (zip bombs declare absurd sizes).
MAX_MEMBER_BYTES = 1 << 30
#: A compressed tar is read whole into memory: its members may add up to at most this many bytes.
MAX_IN_MEMORY_BYTES = 2 << 30
#: What holding one member's metadata costs, counted against ``MAX_IN_MEMORY_BYTES`` (a bomb can also be
#: millions of empty members).
MEMBER_OVERHEAD_BYTES = 1024


class FileStore(Protocol):
    """What the dataset readers need: relative POSIX names, and a binary stream for each."""

    names: list[str]
    skipped: list[str]  # "name (reason)" for every file the store leaves out

    def open(self, name: str) -> BinaryIO: ...

    def describe(self, name: str) -> str: ...


def is_archive(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def open_store(path: str | os.PathLike, *, follow_symlinks: bool = False) -> FileStore:
    """A :class:`DirectoryStore` or an archive store for ``path``."""
    path = Path(path).expanduser()
    if path.is_dir():
        return DirectoryStore(path, follow_symlinks=follow_symlinks)
    if not path.is_file():
        raise DataError(f"dataset not found: {path}")
    if str(path).lower().endswith(".zip"):
        return ZipStore(path)
    if is_archive(path):
        return TarStore(path)
    raise DataError(f"{path} is neither a folder nor a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")


def safe_member_name(name: str, archive: Path) -> str:
    """Normalised relative name of an archive member; DataError for absolute or ``..`` paths."""
    posix = name.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or ".." in parts:
        raise DataError(
            f"refusing archive {archive}: member {name!r} has an absolute or '..' path "
            "(path traversal; the archive is malformed or hostile)"
        )
    return "/".join(parts)


def _empty_dirs(dirs: set[str], names: list[str]) -> list[str]:
    """The folders (archive directory entries) with no file anywhere under them."""
    occupied = {"/".join(n.split("/")[:i]) for n in names for i in range(1, n.count("/") + 1)}
    return sorted(d for d in dirs if d not in occupied)


def _not_listable(path: str, relative: str) -> str | None:
    """Why a directory entry cannot be a dataset file (None when it can): not UTF-8, or not a regular file."""
    if not is_utf8_name(relative):
        return "its name is not valid UTF-8: rename it"
    try:
        mode = os.stat(path).st_mode  # follows a symlink (one leading outside was dealt with before)
    except OSError as err:
        return f"cannot read it: {err.strerror}"
    return None if stat.S_ISREG(mode) else f"{file_kind(mode)}, not a regular file"


def _warn_ignored(what: str, where: Path, names: list[str]) -> None:
    if names:
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        warnings.warn(f"{where}: ignored {len(names)} {what}: {shown}", UserWarning, stacklevel=3)


class DirectoryStore:
    """Files under a folder, as relative POSIX names (symlink policy in the module docstring)."""

    def __init__(self, root: str | os.PathLike, *, follow_symlinks: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.follow_symlinks = follow_symlinks
        self.empty_dirs: list[str] = []  # folders with nothing in them (an empty class is an error)
        self.skipped: list[str] = []
        self.names = self._walk()

    def _walk(self) -> list[str]:
        real_root = os.path.realpath(self.root)
        names: list[str] = []
        escaping: list[str] = []
        visited: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in visited:  # a symlink cycle or a second link to the same folder
                dirnames[:] = []
                continue
            visited.add(real)
            relative_dir = Path(dirpath).relative_to(self.root)
            kept_dirs = []
            for name in sorted(dirnames):
                if self._escapes(os.path.join(dirpath, name), real_root):
                    escaping.append((relative_dir / name).as_posix() + "/")
                else:
                    kept_dirs.append(name)
            dirnames[:] = kept_dirs
            if not kept_dirs and not filenames:
                self.empty_dirs.append(relative_dir.as_posix())
            for name in sorted(filenames):
                relative = (relative_dir / name).as_posix()
                if self._escapes(os.path.join(dirpath, name), real_root):
                    escaping.append(relative)
                elif reason := _not_listable(os.path.join(dirpath, name), relative):
                    self.skipped.append(f"{printable_name(relative)} ({reason})")
                else:
                    names.append(relative)
        _warn_ignored("symlinks leading outside the folder (pass follow_symlinks=True to follow them)",
                      self.root, escaping)  # fmt: skip
        return names

    def _escapes(self, path: str, real_root: str) -> bool:
        if self.follow_symlinks or not os.path.islink(path):
            return False
        target = os.path.realpath(path)
        return os.path.commonpath([target, real_root]) != real_root

    def open(self, name: str) -> BinaryIO:
        try:
            return open_regular(self.root / name)
        except OSError as err:
            raise DataError(f"cannot read {self.describe(name)}: {err}") from err

    def describe(self, name: str) -> str:
        return str(self.root / name)


class _ArchiveStore:
    """Shared parts of the archive stores: per-process handles (DataLoader workers) and naming."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.skipped: list[str] = []  # links and special members are warned about instead
        self._handle: object | None = None
        self._pid = -1

    def describe(self, name: str) -> str:
        return f"{self.path}:{name}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": -1}

    def _check_size(self, name: str, size: int) -> None:
        if size > MAX_MEMBER_BYTES:
            raise DataError(
                f"refusing {self.describe(name)}: it declares {size} bytes, more than the limit of "
                f"{MAX_MEMBER_BYTES} (possibly a decompression bomb; raise resnetlab.data.stores.MAX_MEMBER_BYTES "
                "if you trust it)"
            )


class ZipStore(_ArchiveStore):
    """Random access into a .zip through its central directory."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._infos: dict[str, zipfile.ZipInfo] = {}
        links: list[str] = []
        dirs: set[str] = set()
        for info in self._zip().infolist():
            name = safe_member_name(info.filename, path)
            if not name or info.is_dir():  # (is_dir fails on an empty name)
                if name:
                    dirs.add(name)
                continue
            if stat.S_ISLNK(info.external_attr >> 16):
                links.append(name)
                continue
            self._infos[name] = info
        self.names = list(self._infos)
        self.empty_dirs = _empty_dirs(dirs, self.names)  # an empty class is an error, as for folders
        _warn_ignored("symlink members (never followed)", path, links)

    def _zip(self) -> zipfile.ZipFile:
        if self._handle is None or self._pid != os.getpid():
            try:
                self._handle = zipfile.ZipFile(self.path)
            except (OSError, zipfile.BadZipFile, ValueError, NotImplementedError) as err:
                raise DataError(f"cannot read zip archive {self.path}: {err}") from err
            self._pid = os.getpid()
        return self._handle  # type: ignore[return-value]

    def open(self, name: str) -> BinaryIO:
        info = self._infos[name]
        self._check_size(name, max(info.file_size, info.compress_size))
        encrypted = info.flag_bits & 1
        if info.compress_type == zipfile.ZIP_STORED and not encrypted and info.compress_size != info.file_size:
            raise DataError(
                f"refusing {self.describe(name)}: it declares {info.file_size} bytes but stores "
                f"{info.compress_size} (the archive is corrupt or hostile)"
            )
        try:  # ZipFile.read would decompress a whole member before cutting it to its declared size
            with self._zip().open(info) as member:
                data = member.read(info.file_size + 1)  # at most what it declares; the CRC is checked
        except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError) as err:
            raise DataError(f"cannot read {self.describe(name)}: {err}") from err
        if len(data) != info.file_size:
            raise DataError(
                f"cannot read {self.describe(name)}: it declares {info.file_size} bytes but holds {len(data)} "
                "(the archive is corrupt or hostile)"
            )
        return io.BytesIO(data)


class TarStore(_ArchiveStore):
    """A tar archive: random access by offset when uncompressed; compressed ones (.tar.gz/.xz/.bz2)
    can only be read front to back, so their members are read once, in one pass, into memory."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.compressed = not str(path).lower().endswith(".tar")
        self._members: dict[str, tarfile.TarInfo] = {}
        self._contents: dict[str, bytes] = {}
        links: list[str] = []
        dirs: set[str] = set()
        held = 0  # bytes a compressed archive will hold in memory
        try:
            with tarfile.open(path) as archive:
                for member in archive:
                    name = safe_member_name(member.name, path)
                    if self.compressed:
                        held += MEMBER_OVERHEAD_BYTES + (member.size if member.isfile() else 0)
                        self._check_total(held)
                    if member.isdir() or not name:
                        if name:
                            dirs.add(name)
                        continue
                    if not member.isfile() or member.issparse():
                        links.append(name)
                        continue
                    self._check_size(name, member.size)
                    self._members[name] = member
                    if self.compressed:
                        self._contents[name] = archive.extractfile(member).read()  # type: ignore[union-attr]
        except (OSError, tarfile.TarError, EOFError, ValueError, lzma.LZMAError, zlib.error) as err:
            raise DataError(f"cannot read tar archive {path}: {err}") from err
        self.names = list(self._members)
        self.empty_dirs = _empty_dirs(dirs, self.names)  # an empty class is an error, as for folders
        _warn_ignored("link or special members (never followed)", path, links)

    def _check_total(self, held: int) -> None:
        if held > MAX_IN_MEMORY_BYTES:
            raise DataError(
                f"refusing {self.path}: a compressed tar is read whole into memory and its members add up to "
                f"more than {MAX_IN_MEMORY_BYTES} bytes (possibly a decompression bomb). Extract it, or repack it "
                "as .zip or uncompressed .tar (both are read in place), or raise "
                "resnetlab.data.stores.MAX_IN_MEMORY_BYTES if you trust it"
            )

    def open(self, name: str) -> BinaryIO:
        if self.compressed:
            return io.BytesIO(self._contents[name])
        member = self._members[name]
        try:
            if self._handle is None or self._pid != os.getpid():
                self._handle, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115 - kept open
            handle: BinaryIO = self._handle  # type: ignore[assignment]
            handle.seek(member.offset_data)
            data = handle.read(member.size)
        except OSError as err:
            raise DataError(f"cannot read {self.describe(name)}: {err}") from err
        if len(data) != member.size:
            raise DataError(f"cannot read {self.describe(name)}: archive is truncated")
        return io.BytesIO(data)
