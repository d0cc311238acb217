"""The CIFAR python-format reader, on small batch files written here in the official pickled format."""

from __future__ import annotations

import contextlib
import io
import pickle
import struct
import tarfile
import tracemalloc
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import fuzz
from resnetlab.data import CIFAR10_CLASSES, CIFAR10_MEAN, build_data
from resnetlab.data.cifar import _frombuffer, _reconstruct, cifar_batch_arrays, read_cifar_pickle
from resnetlab.errors import DataError

PER_BATCH = 4


def dump(path: Path, obj: object, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def batch(start: int, count: int, label_key: bytes = b"labels", classes: int = 10) -> dict:
    data = (np.arange(count * 3072, dtype=np.int64).reshape(count, 3072) + start) % 251
    return {
        b"batch_label": b"testing batch",
        label_key: [(start + i) % classes for i in range(count)],
        b"data": data.astype(np.uint8),
        b"filenames": [f"img_{start + i}.png".encode() for i in range(count)],
    }


class Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING), as in the official CIFAR files made with Python 2."""

    def save_bytes(self, obj: bytes) -> None:
        size = len(obj)
        opcode = pickle.SHORT_BINSTRING + bytes([size]) if size < 256 else pickle.BINSTRING + struct.pack("<i", size)
        self.write(opcode + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}  # noqa: RUF012 - pickle's own convention


def test_python2_style_batch():
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(batch(0, 2))
    assert b"_codecs" not in buffer.getvalue()  # really Python 2 strings, not Python 3 bytes
    images, labels = cifar_batch_arrays(read_cifar_pickle(buffer.getvalue()), "labels", 10)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]
    assert (images.reshape(2, -1) == batch(0, 2)[b"data"]).all()


def write_cifar10(folder: Path, protocol: int = 2) -> Path:
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", batch(i * PER_BATCH, PER_BATCH), protocol)
    dump(folder / "test_batch", batch(0, 3), protocol)
    dump(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}, protocol)
    return folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_folder(tmp_path, protocol):
    folder = write_cifar10(tmp_path / "cifar-10-batches-py", protocol)
    bundle = build_data(folder, augment="none")
    assert bundle.name == "cifar10" and bundle.classes == list(CIFAR10_CLASSES)
    assert (len(bundle.train), len(bundle.test), bundle.in_chans, bundle.image_size) == (20, 3, 3, 32)
    assert bundle.mean == CIFAR10_MEAN
    assert bundle.train.targets == [(PER_BATCH + i) % 10 for i in range(20)]
    raw = bundle.train.get_image(0)
    expected = batch(PER_BATCH, 1)[b"data"][0]
    assert raw.shape == (3, 32, 32) and raw[1, 0, 0] == expected[1024] and raw[2, 31, 31] == expected[3071]
    assert bundle.train[0][0].shape == (3, 32, 32)
    assert len(build_data(tmp_path, augment="none").train) == 20  # the parent folder works too


def test_cifar10_official_tarball_is_read_in_place(tmp_path):
    write_cifar10(tmp_path / "src" / "cifar-10-batches-py")
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    assert len(build_data(root / "cifar-10-python.tar.gz").test) == 3
    bundle = build_data("cifar10", root=root, val_split=10, seed=3)  # found by name under root
    assert (len(bundle.train), len(bundle.val)) == (10, 10)
    assert not (root / "cifar-10-batches-py").exists()  # nothing was extracted


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, start, count in (("train", 0, 12), ("test", 100, 5)):
        content = batch(start, count, b"fine_labels", 100)
        content[b"coarse_labels"] = [0] * count
        dump(folder / split, content)
    dump(folder / "meta", {b"fine_label_names": [f"c{i:02d}".encode() for i in range(100)],
                           b"coarse_label_names": [b"x"] * 20})  # fmt: skip
    bundle = build_data(folder)
    assert bundle.name == "cifar100" and len(bundle.classes) == 100 and bundle.classes[7] == "c07"
    assert (len(bundle.train), len(bundle.test)) == (12, 5) and bundle.test.targets[0] == 0


def test_named_cifar_offline(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="download=True"):
        build_data("cifar10", root=tmp_path)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.download_url", offline)
    with pytest.raises(DataError, match="could not download cifar100"):
        build_data("cifar100", root=tmp_path, download=True)


class Evil:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("wrap", [lambda e: e, lambda e: {b"data": np.array([e], dtype=object), b"labels": []}])
def test_unsafe_pickles_are_refused_without_running_them(tmp_path, wrap):
    target = tmp_path / "pwned"
    with pytest.raises(DataError, match="forbidden"):
        read_cifar_pickle(pickle.dumps(wrap(Evil(target)), protocol=2), name="evil_batch")
    assert not target.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2], "expected a dict"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"\(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "outside"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "missing"),
    ],
)
def test_malformed_batches(content, message):
    with pytest.raises(DataError, match=message):
        cifar_batch_arrays(read_cifar_pickle(pickle.dumps(content, protocol=2)), "labels", 10)


def test_truncated_batch_file(tmp_path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-py")
    data = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="data_batch_3"):
        build_data(folder)


class Reduces:
    """Pickles as ``func(*args)`` followed, when ``state`` is given, by BUILD ``state`` (what numpy arrays do)."""

    def __init__(self, func, args, state=None) -> None:
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.reduced


def _empty_array(state) -> Reduces:  # how numpy pickles an array: an empty one, then its state
    return Reduces(_reconstruct, (np.ndarray, (0,), b"b"), state)


_BOMBS = {
    # an object array with a lying shape: 1.2 GB of pointers for a ~220-byte file (and numpy 2.4's own
    # __setstate__ crashes the process on it)
    "object-array": _empty_array((1, (150_000_000,), np.dtype("O"), False, [None])),
    "short-data": _empty_array((1, (150_000_000,), np.dtype("u1"), False, b"x")),
    "over-cifar-size": _empty_array((1, (200_000, 3072), np.dtype("u1"), False, b"")),
    "void-dtype": _empty_array((1, (1,), np.dtype("V1000000000"), False, b"")),
    "ndarray-called": Reduces(np.ndarray, ((1_200_000_000,), "u1")),
    "reconstruct-shape": Reduces(_reconstruct, (np.ndarray, (1_200_000_000,), b"b")),
    "frombuffer-shape": Reduces(_frombuffer, (b"x", np.dtype("u1"), (150_000_000,), "C")),
}


@pytest.mark.parametrize("name", list(_BOMBS))
def test_array_bombs_are_refused_before_allocation(name):
    """A few hundred bytes that would make numpy allocate (or crash on) gigabytes: refused from the shape
    and dtype, with the peak allocation far below the size asked for."""
    data = pickle.dumps({b"data": _BOMBS[name], b"labels": [0]}, protocol=2)
    assert len(data) < 400
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="bomb_batch"):
            read_cifar_pickle(data, name="bomb_batch")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_largest_official_array_is_still_accepted():
    """The size check matches the CIFAR layout: CIFAR-100's 50,000 x 3,072 training array loads."""
    data = {b"data": np.zeros((50_000, 3072), np.uint8), b"fine_labels": [0] * 50_000}
    images, labels = cifar_batch_arrays(read_cifar_pickle(pickle.dumps(data, protocol=4)), "fine_labels", 100)
    assert images.shape == (50_000, 3, 32, 32) and len(labels) == 50_000 and type(images) is np.ndarray


def _read(data: bytes) -> None:
    with contextlib.suppress(DataError):
        cifar_batch_arrays(read_cifar_pickle(data), "labels", 10)


@fuzz(1000)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_only_raise_data_error(data):
    _read(data)


_VALID = [pickle.dumps(batch(0, 1), protocol=p) for p in (2, 4, 5)]


@fuzz(1000)
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6),
       st.integers(0, 1 << 16))  # fmt: skip
def test_fuzz_corrupted_batches_only_raise_data_error(valid, edits, cut):
    data = bytearray(valid)
    for position, value in edits:
        data[position % len(data)] = value
    _read(bytes(data[: max(1, cut % (len(data) + 1))]))
