"""CIFAR-10/100 in the official python format, read without unsafe unpickling.

The official batches are pickles. A pickle can run arbitrary code, so they are read with an unpickler
that can build only dicts, lists, strings, bytes and numpy arrays of plain numbers, each checked against
the CIFAR sizes before numpy allocates it; anything else is refused. The same
reader works on a ``cifar-10-batches-py/`` / ``cifar-100-python/`` folder or directly inside the
official ``.tar.gz`` (nothing is extracted).
"""

from __future__ import annotations

import codecs
import io
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from resnetlab.data.stores import FileStore, TarStore, open_store
from resnetlab.errors import DataError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
    from numpy._core.numeric import _frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct
    from numpy.core.numeric import _frombuffer

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
#: Official download locations (the same as torchvision's).
DOWNLOADS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}  # fmt: skip


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Protocol-2 pickles spell ``bytes`` as ``_codecs.encode(text, 'latin1')``; allow only that."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError("only latin-1 byte strings are allowed")
    return text.encode("latin1")


#: The largest array in an official CIFAR file: CIFAR-100's 50,000 training images of 3,072 bytes.
MAX_ARRAY_BYTES = 50_000 * 3072


def _check_array(shape: Any, dtype: Any, nbytes: int | None) -> None:
    """Refuse an array before numpy allocates it: plain numbers only, CIFAR-sized at most, and exactly
    as many bytes of data as its shape needs (numpy allocates by shape, so a short buffer or an object
    array with a lying shape could exhaust memory or crash numpy itself)."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"arrays of {dtype!r} are not allowed in a CIFAR batch (plain numbers only)")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 8:
        raise pickle.UnpicklingError(f"invalid array shape {shape!r}")
    size = dtype.itemsize * math.prod(shape)
    if size > MAX_ARRAY_BYTES:
        raise pickle.UnpicklingError(
            f"an array of {size} bytes exceeds the largest CIFAR array ({MAX_ARRAY_BYTES} bytes)"
        )
    if nbytes != size:
        raise pickle.UnpicklingError(f"array data holds {nbytes} bytes but its shape {shape} needs {size}")


def _byte_count(raw: Any) -> int | None:
    if isinstance(raw, str):  # Python 2 str, decoded as latin-1; numpy encodes it back
        return len(raw)
    try:
        return memoryview(raw).nbytes
    except TypeError:
        return None


class _CheckedArray(np.ndarray):
    """What ``_reconstruct`` builds: an empty array whose state (shape, dtype, data) is checked before
    numpy's own ``__setstate__`` allocates anything. Turned into a plain ndarray after loading."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed array state")
        shape, dtype, _, raw = state[-4:]
        _check_array(shape, dtype, _byte_count(raw))
        super().__setstate__(state)


class _NdarrayName:
    """Stands for ``numpy.ndarray`` in a pickle: accepted by ``_reconstruct``, not callable."""


def _checked_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _NdarrayName or shape != (0,):  # numpy always pickles an empty array, then its state
        raise pickle.UnpicklingError("only plain numpy arrays are allowed in a CIFAR batch")
    return _reconstruct(_CheckedArray, (0,), dtype)


def _checked_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Protocol-5 arrays: ``frombuffer(...).reshape(shape)``, checked the same way."""
    _check_array(shape, dtype, _byte_count(buffer))
    return np.asarray(_frombuffer(buffer, dtype, shape, order))


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _checked_reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _checked_frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NdarrayName,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden object {module}.{name} in a CIFAR batch") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in a CIFAR batch")


def read_cifar_pickle(data: bytes, *, name: str = "<bytes>") -> dict[str, Any]:
    """Unpickle one CIFAR batch/meta file safely; keys come back as ``str``."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as err:  # any malformed pickle: the reader must only ever raise DataError
        raise DataError(f"{name} is not a readable CIFAR pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{name} is not a CIFAR batch: expected a dict, got {type(obj).__name__}")
    return {
        k.decode("latin1") if isinstance(k, bytes) else str(k): v.view(np.ndarray) if isinstance(v, np.ndarray) else v
        for k, v in obj.items()
    }


def cifar_batch_arrays(batch: dict[str, Any], label_key: str, num_classes: int, *,
                       name: str = "<batch>") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Validated ``(images uint8 (N,3,32,32), labels int64 (N,))`` from an unpickled batch."""
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{name}: 'data' must be a uint8 array of shape (N, 3072)")
    try:
        targets = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as err:
        raise DataError(f"{name}: '{label_key}' is missing or not a list of integers") from err
    if len(targets) != len(data):
        raise DataError(f"{name}: has {len(data)} images but {len(targets)} '{label_key}'")
    if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
        raise DataError(f"{name}: labels outside [0, {num_classes})")
    return data.reshape(-1, 3, 32, 32), targets


@dataclass
class CifarLayout:
    """Where the official files of one CIFAR variant sit in a store."""

    name: str  # "cifar10" or "cifar100"
    meta: str
    train: tuple[str, ...]
    test: str


def find_cifar_layout(names: list[str]) -> CifarLayout | None:
    """Recognise the official file names (in any one folder of the store), else None."""
    by_folder: dict[str, set[str]] = {}
    for name in names:
        path = PurePosixPath(name)
        by_folder.setdefault(str(path.parent), set()).add(path.name)
    for folder, files in sorted(by_folder.items()):

        def full(file: str, folder: str = folder) -> str:
            return file if folder == "." else f"{folder}/{file}"

        if {"batches.meta", "test_batch", *_CIFAR10_TRAIN} <= files:
            return CifarLayout("cifar10", full("batches.meta"), tuple(map(full, _CIFAR10_TRAIN)), full("test_batch"))
        if {"meta", "train", "test"} <= files:
            return CifarLayout("cifar100", full("meta"), (full("train"),), full("test"))
    return None


def read_cifar(store: FileStore, layout: CifarLayout) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Class names and ``{"train": (images, labels), "test": ...}`` from the official batches."""

    def load(name: str) -> dict[str, Any]:
        with store.open(name) as stream:
            return read_cifar_pickle(stream.read(), name=store.describe(name))

    meta = load(layout.meta)
    names_key, label_key = (
        ("label_names", "labels") if layout.name == "cifar10" else ("fine_label_names", "fine_labels")
    )
    raw_classes = meta.get(names_key)
    if not isinstance(raw_classes, list) or not raw_classes:
        raise DataError(f"{store.describe(layout.meta)}: no '{names_key}' list")
    classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in raw_classes]
    splits = {}
    for split, files in (("train", layout.train), ("test", (layout.test,))):
        parts = [cifar_batch_arrays(load(f), label_key, len(classes), name=store.describe(f)) for f in files]
        splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return classes, splits


def locate_or_download_cifar(name: str, root: Path, *, download: bool) -> FileStore:
    """The store holding CIFAR ``name`` under ``root``: an extracted folder or the official tarball,
    downloaded (md5-checked, never extracted) when ``download=True``."""
    url, md5 = DOWNLOADS[name]
    tarball = root / os.path.basename(url)
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    if folder.is_dir():
        return open_store(folder)
    if not tarball.is_file():
        if not download:
            raise DataError(
                f"{name} is not in {root}; add --download to fetch it (download=True in Python; needs internet), "
                f"or pass the path of {tarball.name} or of its extracted folder (get it from {url})"
            )
        from torchvision.datasets.utils import download_url

        try:
            download_url(url, str(root), filename=tarball.name, md5=md5)
        except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
            raise DataError(
                f"could not download {name} from {url} ({type(err).__name__}: {err}); without internet, "
                "download it elsewhere and pass the file's path"
            ) from err
    return TarStore(tarball)
