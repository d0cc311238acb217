"""File stores and the ImageFolder index: archives read in place, hostile archives refused, symlinks."""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

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
