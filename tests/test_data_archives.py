"""File stores and the ImageFolder index: archives read in place, hostile archives refused, symlinks."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import struct
import tarfile
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fuzzing import fuzz
from resnetlab.data import build_data, open_store, stores
from resnetlab.data.folders import index_image_folder
from resnetlab.errors import DataError

LAYOUT = {
    "pets/train/cat/0.png": (255, 0, 0),
    "pets/train/cat/1.png": (250, 0, 0),
    "pets/train/dog/0.png": (0, 255, 0),
    "pets/train/dog/sub/1.png": (0, 250, 0),
    "pets/val/cat/2.png": (245, 0, 0),
    "pets/val/dog/2.png": (0, 245, 0),
}


def png(color, size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def files() -> dict[str, bytes]:
    content = {name: png(color) for name, color in LAYOUT.items()}
    content["pets/train/README.txt"] = b"not an image"
    content["pets/train/dog/.DS_Store"] = b"\0"
    return content


def write_zip(path: Path, content: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in content.items():
            archive.writestr(name, data)
    return path


def write_tar(path: Path, content: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in content.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def write_dir(root: Path, content: dict[str, bytes]) -> Path:
    for name, data in content.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))


def test_index_layouts():
    index = index_image_folder(list(files()), where="t")
    assert index.classes == ["cat", "dog"]
    assert index.splits["train"] == [
        ("pets/train/cat/0.png", 0), ("pets/train/cat/1.png", 0),
        ("pets/train/dog/0.png", 1), ("pets/train/dog/sub/1.png", 1),
    ]  # fmt: skip
    assert [s for s in index.splits] == ["train", "val"]
    assert index.skipped == ["pets/train/README.txt (outside the <split>/<class>/ layout)"]
    flat = index_image_folder(["b/1.jpg", "a/2.JPG", "a/notes.md"], where="t")
    assert flat.classes == ["a", "b"] and flat.splits == {"train": [("a/2.JPG", 0), ("b/1.jpg", 1)]}
    assert flat.skipped == ["a/notes.md (not an image extension)"]
    wrapped = index_image_folder(["README", "data/LICENSE", "data/train/b/1.png", "data/val/a/2.png"], where="t")
    assert wrapped.classes == ["a", "b"] and set(wrapped.splits) == {"train", "val"}
    assert len(wrapped.skipped) == 2
    with pytest.raises(DataError, match="no images"):
        index_image_folder(["a.txt"], where="t")


@pytest.mark.parametrize("kind", ["dir", "zip", "tar", "tar.gz", "tar.xz"])
def test_image_folder_sources_agree(tmp_path, kind):
    content = files()
    if kind == "dir":
        source = write_dir(tmp_path / "pets_dir", content)
    elif kind == "zip":
        source = write_zip(tmp_path / "pets.zip", content)
    else:
        mode = {"tar": "w", "tar.gz": "w:gz", "tar.xz": "w:xz"}[kind]
        source = write_tar(tmp_path / f"pets.{kind}", content, mode)
    with pytest.warns(UserWarning, match="README.txt"):
        bundle = build_data(source, augment="none")
    assert bundle.classes == ["cat", "dog"] and bundle.in_chans == 3 and bundle.image_size == 8
    assert (len(bundle.train), len(bundle.val), bundle.test) == (4, 2, None)
    assert bundle.train.targets == [0, 0, 1, 1] and bundle.val.targets == [0, 1]
    image, label = bundle.val[1]
    assert image.shape == (3, 8, 8) and label == 1
    pixel = image[:, 0, 0] * torch.tensor(bundle.std) + torch.tensor(bundle.mean)  # undo normalisation
    assert pixel[1] > 0.9 and pixel[0] < 0.1  # a green dog
    assert len(list((tmp_path / "cache" / "datasets").glob("*.safetensors"))) == 1  # small images: cached


def test_lazy_decoding_for_large_images(tmp_path):
    content = {f"set/{c}/{i}.png": png((i, 0, 0), size=(80, 70)) for c in ("x", "y") for i in range(3)}
    content["set/x/broken.png"] = b"\x89PNG broken"
    source = write_zip(tmp_path / "big.zip", content)
    with pytest.warns(UserWarning, match=r"broken\.png"):
        bundle = build_data(source, image_size=64, augment="imagenet")
    assert type(bundle.train).__name__ == "LazyImageDataset" and len(bundle.train) == 6
    assert any("broken.png" in s for s in bundle.skipped)
    assert bundle.train[0][0].shape == (3, 64, 64) and bundle.mean == (0.485, 0.456, 0.406)
    assert not (tmp_path / "cache").exists()


def test_cache_is_reused_and_invalidated(tmp_path):
    source = write_zip(tmp_path / "pets.zip", files())
    with pytest.warns(UserWarning):
        build_data(source)
    cache_files = list((tmp_path / "cache" / "datasets").glob("*.safetensors"))
    assert len(cache_files) == 1
    with pytest.warns(UserWarning):
        again = build_data(source)  # from the cache: the skipped files are still reported
    assert len(again.train) == 4
    os.utime(source, (1, 1))  # a changed source gets a new cache file
    with pytest.warns(UserWarning):
        build_data(source)
    assert len(list((tmp_path / "cache" / "datasets").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("bad_name", ["../evil.png", "/abs/evil.png", "pets/../../evil.png", "..\\evil.png"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_path_traversal_members_refuse_the_archive(tmp_path, kind, bad_name):
    (tmp_path / "inner").mkdir()
    content = {**files(), bad_name: png((1, 2, 3))}
    path = tmp_path / "inner" / f"evil.{kind}"
    write_zip(path, content) if kind == "zip" else write_tar(path, content)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match="path traversal"):
        build_data(path)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "evil.png").exists() and not Path("/abs/evil.png").exists()


def test_tar_links_are_ignored_not_followed(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png((9, 9, 9)))
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as archive:
        for name, data in files().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, link_type in (("pets/train/cat/s.png", tarfile.SYMTYPE), ("pets/train/cat/h.png", tarfile.LNKTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = link_type, str(secret)
            archive.addfile(link)
    with pytest.warns(UserWarning, match="link or special members"):
        store = open_store(path)
    assert not any(n.endswith(("/s.png", "/h.png")) for n in store.names)


def test_zip_symlink_members_are_ignored(tmp_path):
    path = write_zip(tmp_path / "links.zip", files())
    with zipfile.ZipFile(path, "a") as archive:
        info = zipfile.ZipInfo("pets/train/cat/link.png")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        archive.writestr(info, "/etc/passwd")
    with pytest.warns(UserWarning, match="symlink members"):
        store = open_store(path)
    assert "pets/train/cat/link.png" not in store.names


def test_directory_symlinks_outside_root_need_follow_symlinks(tmp_path):
    root = write_dir(tmp_path / "root", {k: v for k, v in files().items() if k.startswith("pets/train/")})
    outside = write_dir(tmp_path / "outside", {"cow/0.png": png((1, 1, 1)), "x.png": png((2, 2, 2))})
    (root / "pets/train/cow").symlink_to(outside / "cow", target_is_directory=True)
    (root / "pets/train/cat/escape.png").symlink_to(outside / "x.png")
    (root / "pets/train/cat/inside.png").symlink_to(root / "pets/train/cat/0.png")
    (root / "pets/train/dog/loop").symlink_to(root / "pets", target_is_directory=True)  # a cycle
    with pytest.warns(UserWarning, match="symlinks leading outside"):
        names = open_store(root).names
    assert "pets/train/cat/inside.png" in names
    assert not any("cow" in n or "escape" in n for n in names)
    followed = open_store(root, follow_symlinks=True).names
    assert "pets/train/cow/0.png" in followed and "pets/train/cat/escape.png" in followed


def test_not_an_archive_or_missing(tmp_path):
    (tmp_path / "x.rar").write_bytes(b"rar")
    with pytest.raises(DataError, match="neither a folder nor a supported archive"):
        build_data(tmp_path / "x.rar")
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    with pytest.raises(DataError, match=r"bad\.zip"):
        build_data(tmp_path / "bad.zip")
    with pytest.raises(DataError, match="dataset not found"):
        build_data(tmp_path / "missing")


@pytest.mark.filterwarnings("ignore:.*README.txt")
def test_small_images_without_cache_or_of_mixed_sizes_decode_per_item(tmp_path):
    source = write_dir(tmp_path / "pets", files())
    with pytest.warns(UserWarning):
        lazy = build_data(source, cache=False)
    assert type(lazy.train).__name__ == "LazyImageDataset" and lazy.image_size == 8 and lazy.augment == "cifar"
    (source / "pets/train/cat/odd.png").write_bytes(png((1, 1, 1), size=(9, 8)))
    with pytest.warns(UserWarning, match="differ in size"):
        mixed = build_data(source, image_size=8)
    assert type(mixed.train).__name__ == "LazyImageDataset" and len(mixed.train) == 5
    assert {tuple(mixed.train[i][0].shape) for i in range(5)} == {(3, 8, 8)}


def test_empty_class_folder_is_an_error(tmp_path):
    from PIL import Image

    from resnetlab.data import build_data

    (tmp_path / "train" / "ants").mkdir(parents=True)
    (tmp_path / "train" / "bees").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(tmp_path / "train" / "ants" / "a.png")
    with pytest.raises(DataError, match=r"train/bees .*has no images"):
        build_data(tmp_path)


# ---------------------------------------------------------------------------- decompression bombs
def refused_with_peak(action) -> tuple[str, int]:
    """``action()`` must raise DataError: its message, and the peak Python/numpy heap allocation meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as caught:
            action()
        return str(caught.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_tar_gz_bomb_is_refused_before_its_members_are_read(tmp_path, monkeypatch):
    """A real bomb: 64 MiB of zeros in a ~65 KB .tar.gz, with a 16 MiB limit on what may be held in memory."""
    monkeypatch.setattr(stores, "MAX_IN_MEMORY_BYTES", 16 << 20)
    path = write_tar(tmp_path / "bomb.tar.gz", {**files(), "pets/train/cat/zeros.png": bytes(64 << 20)}, "w:gz")
    assert path.stat().st_size < 200_000
    message, peak = refused_with_peak(lambda: open_store(path))
    assert "bomb.tar.gz" in message and "repack it" in message and peak < 2 << 20


def test_tar_gz_of_many_small_members_counts_towards_the_limit(tmp_path, monkeypatch):
    """Millions of empty members are a bomb too: each costs memory to index."""
    monkeypatch.setattr(stores, "MAX_IN_MEMORY_BYTES", 1 << 20)
    path = write_tar(tmp_path / "many.tar.gz", {f"pets/train/cat/{i}.png": b"" for i in range(2000)}, "w:gz")
    with pytest.raises(DataError, match="add up to more than"):
        open_store(path)
    monkeypatch.setattr(stores, "MAX_IN_MEMORY_BYTES", 4 << 20)  # the same archive under a larger limit
    assert len(open_store(path).names) == 2000


@pytest.mark.parametrize("suffix", ["tar", "tar.gz"])
def test_tar_member_declaring_an_absurd_size_is_refused_without_reading(tmp_path, suffix):
    """A header that declares 2 GiB followed by nothing: refused from the header alone."""
    header = tarfile.TarInfo("pets/train/cat/huge.png")
    header.size = 2 << 30
    raw = header.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024)
    path = tmp_path / f"huge.{suffix}"
    path.write_bytes(raw if suffix == "tar" else gzip.compress(raw))
    message, peak = refused_with_peak(lambda: open_store(path))
    assert f"huge.{suffix}" in message and "refusing" in message and peak < 1 << 20


def _zip_declaring(path: Path, data: bytes, declared: int, compression: int) -> Path:
    """A one-member zip whose headers claim ``declared`` uncompressed bytes (the content is ``data``)."""
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("pets/train/cat/x.png", data)
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")
    raw[22:26] = struct.pack("<I", declared)  # the local header is at offset 0
    raw[central + 24 : central + 28] = struct.pack("<I", declared)
    path.write_bytes(bytes(raw))
    return path


def test_zip_bomb_member_is_refused_before_it_is_decompressed(tmp_path, monkeypatch):
    monkeypatch.setattr(stores, "MAX_MEMBER_BYTES", 1 << 20)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pets/train/cat/zeros.png", bytes(32 << 20))  # 32 MiB -> ~32 KB
        archive.writestr("pets/train/cat/ok.png", png((1, 2, 3)))
    assert (tmp_path / "bomb.zip").stat().st_size < 100_000
    store = open_store(tmp_path / "bomb.zip")
    message, peak = refused_with_peak(lambda: store.open("pets/train/cat/zeros.png"))
    assert "zeros.png: it declares 33554432 bytes" in message and peak < 1 << 20
    assert store.open("pets/train/cat/ok.png").read() == png((1, 2, 3))  # the rest of the archive still reads


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
@pytest.mark.parametrize("declared", [100, (8 << 20) + 1], ids=["declares-less", "declares-more"])
def test_zip_member_whose_content_is_not_its_declared_size_is_refused(tmp_path, compression, declared):
    """Declared sizes that lie are caught: from the headers alone when stored; when compressed, by never
    decompressing past the declared size (then the CRC fails) or by counting what came out. Either way a
    DataError naming the member, and memory bounded by the declared size, not by what the member holds."""
    path = _zip_declaring(tmp_path / "lying.zip", bytes(8 << 20), declared, compression)
    store = open_store(path)
    message, peak = refused_with_peak(lambda: store.open("pets/train/cat/x.png"))
    assert "lying.zip:pets/train/cat/x.png" in message
    assert "declares" in message or "CRC" in message
    # never more than the declared size (plus copies while it is assembled) and the compressed bytes
    assert peak < 3 * declared + path.stat().st_size + (1 << 20)
    if declared == 100:
        assert peak < 1 << 20  # 8 MiB inside, 100 bytes declared: the 8 MiB never exist in memory


# ---------------------------------------------------------------------------- fuzzing
# Only DataError (and warnings about skipped files) may come out of the readers, whatever the input.
_PART = st.one_of(
    st.sampled_from(["train", "val", "test", "cat", "dog", "sub", ".hidden", "__MACOSX", "a b", "ü", "C:", "~"]),
    st.text(st.characters(blacklist_characters="/\\\0", blacklist_categories=("Cs",)), min_size=1, max_size=12),
).filter(lambda p: p not in (".", ".."))
_EXT = st.sampled_from([".png", ".jpg", ".JPEG", ".txt", "", ".gif", ".bmp"])
_HOSTILE = st.sampled_from(["../evil.png", "/abs/evil.png", "a/../../evil.png", "..\\evil.png", "C:\\evil.png",
                            "a/./b.png", "./a/b.png", "a//b.png", "", ".", "a/"])  # fmt: skip


def _bomb_header() -> bytes:
    """A valid small PNG whose header declares 100,000 x 100,000 pixels."""
    data = bytearray(png((0, 0, 0)))
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    return bytes(data)


_SAMPLE_PNG = png((1, 2, 3), size=(12, 12))
_CONTENT = st.one_of(
    st.sampled_from([png((200, 10, 10)), png((10, 200, 10), size=(5, 9)), png((0, 0, 0), size=(1, 1)), b"",
                     _bomb_header()]),
    st.integers(0, len(_SAMPLE_PNG) - 1).map(lambda n: _SAMPLE_PNG[:n]),  # truncated
    st.binary(max_size=64),
)  # fmt: skip


_MEMBERS = st.lists(
    st.tuples(
        st.one_of(st.builds(lambda parts, ext: "/".join(parts) + ext, st.lists(_PART, min_size=1, max_size=4), _EXT),
                  _HOSTILE),
        st.sampled_from(["file", "file", "file", "dir", "symlink", "hardlink", "fifo"]),
        _CONTENT,
    ),
    max_size=8,
)  # fmt: skip


def _archive(path: Path, kind: str, members: list[tuple[str, str, bytes]]) -> Path:
    """An archive of arbitrary members (names unchecked, links pointing anywhere), as a stranger may send."""
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, member_type, data in members:
                info = zipfile.ZipInfo(name + ("/" if member_type == "dir" and not name.endswith("/") else ""))
                if member_type == "symlink":
                    info.create_system, info.external_attr, data = 3, 0o120777 << 16, b"../../etc/passwd"
                archive.writestr(info, b"" if member_type == "dir" else data)
    else:
        with tarfile.open(fileobj=buffer, mode={"tar": "w", "tar.gz": "w:gz"}[kind], format=tarfile.GNU_FORMAT) as tar:
            for name, member_type, data in members:
                info = tarfile.TarInfo(name)
                info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                             "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[member_type]  # fmt: skip
                info.linkname = "/etc/passwd" if member_type in ("symlink", "hardlink") else ""
                info.size = len(data) if member_type == "file" else 0
                tar.addfile(info, io.BytesIO(data) if member_type == "file" else None)
    path.write_bytes(buffer.getvalue())
    return path


def _read_everything(path: Path) -> None:
    """Open the store, check every name is a safe relative path, read every member, index the folder."""
    try:
        store = open_store(path)
    except DataError:
        return
    for name in store.names:
        parts = name.split("/")
        assert not name.startswith("/") and ".." not in parts and "\\" not in name and ":" not in parts[0][1:2]
        try:
            with store.open(name) as stream:
                stream.read()
        except DataError as err:
            assert name in str(err)
    with contextlib.suppress(DataError):
        index_image_folder(store.names, where=str(path))


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz(1000)
@given(kind=st.sampled_from(["zip", "tar", "tar.gz"]), members=_MEMBERS)
def test_fuzz_archives_of_arbitrary_members(tmp_path_factory, kind: str, members) -> None:
    outer = tmp_path_factory.getbasetemp() / "fuzz-archives"
    folder = outer / "inner"
    folder.mkdir(parents=True, exist_ok=True)
    path = _archive(folder / f"a.{kind}", kind, members)
    before = sorted(outer.rglob("*"))
    _read_everything(path)
    assert sorted(outer.rglob("*")) == before  # nothing extracted, beside the archive or above it


_VALID_ARCHIVES: dict[str, bytes] = {}


def _valid_archive(kind: str) -> bytes:
    if kind not in _VALID_ARCHIVES:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"v.{kind}"
            if kind == "zip":
                write_zip(path, files())
            else:
                write_tar(path, files(), {"tar": "w", "tar.gz": "w:gz", "tar.xz": "w:xz"}[kind])
            _VALID_ARCHIVES[kind] = path.read_bytes()
    return _VALID_ARCHIVES[kind]


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz(1000)
@given(kind=st.sampled_from(["zip", "tar", "tar.gz", "tar.xz"]), cut=st.one_of(st.none(), st.floats(0, 1)),
       edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8))  # fmt: skip
def test_fuzz_damaged_archives(tmp_path_factory, kind: str, cut, edits) -> None:
    data = bytearray(_valid_archive(kind))
    if cut is not None:
        data = data[: int(len(data) * cut)]
    for position, value in edits:
        if data:
            data[position % len(data)] = value
    path = tmp_path_factory.getbasetemp() / f"damaged.{kind}"
    path.write_bytes(bytes(data))
    _read_everything(path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz(500)
@given(members=_MEMBERS, links=st.lists(st.tuples(_PART, st.sampled_from(["inside", "outside", "loop"])), max_size=3),
       cache=st.booleans())  # fmt: skip
def test_fuzz_image_folder_directories(tmp_path_factory, members, links, cache: bool) -> None:
    """Arbitrary folder trees (odd names, non-images, truncated images, bomb headers, empty folders, symlinks
    inside, outside and in loops) through build_data and every item: a dataset, or one DataError."""
    base = tmp_path_factory.mktemp("tree")
    root, outside = base / "root", base / "outside"
    write_dir(outside, {"secret/0.png": png((9, 9, 9))})
    root.mkdir(parents=True)
    for name, member_type, data in members:
        target = root / name.replace("\\", "_").lstrip("/")
        if not name.strip("/") or ".." in Path(name).parts or name.startswith("/"):
            continue  # the folder case only holds names a file system can
        with contextlib.suppress(OSError):  # a name clashing with an existing file or folder
            if member_type == "dir":
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
    for name, where in links:
        with contextlib.suppress(OSError):
            source = {"inside": root, "outside": outside / "secret", "loop": base}[where]
            (root / name).symlink_to(source, target_is_directory=True)
    try:
        bundle = build_data(root, cache=cache, augment="none", image_size=8)
    except DataError:
        return
    for dataset in (bundle.train, bundle.val, bundle.test):
        for i in range(len(dataset) if dataset is not None else 0):
            try:
                image, target = dataset[i]
            except DataError:
                continue
            assert image.shape == (3, 8, 8) and 0 <= target < len(bundle.classes)
    store = open_store(root)
    assert not any(n.startswith("secret") or "/secret/" in n for n in store.names)  # outside links not followed
