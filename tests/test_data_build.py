"""build_data end to end: the digits default, held-out splits, transforms, batch mixing, real shared data."""

from __future__ import annotations

import collections
import pickle
import time

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import pil_to_tensor

from resnetlab.data import (
    CIFAR10_CLASSES,
    build_data,
    eval_transform,
    imagenet_train_transform,
    load_image,
    mixup_cutmix,
    open_store,
)
from resnetlab.data.folders import index_image_folder
from resnetlab.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))


def test_digits_default_bundle():
    bundle = build_data()
    assert (bundle.name, bundle.in_chans, bundle.image_size, bundle.augment) == ("digits", 1, 16, "cifar")
    assert (len(bundle.train), bundle.val, len(bundle.test)) == (1437, None, 360)
    assert bundle.classes == [str(d) for d in range(10)] and len(bundle.mean) == len(bundle.std) == 1
    image, label = bundle.train[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32 and isinstance(label, int)
    assert bundle.test.targets == build_data("digits").test.targets  # the test split is fixed
    images, labels = next(iter(DataLoader(bundle.test, batch_size=32)))
    assert images.shape == (32, 1, 16, 16) and labels.dtype == torch.int64
    assert abs(float(images.mean())) < 0.3  # normalised with the dataset's own statistics
    assert build_data(image_size=32).train[0][0].shape == (1, 32, 32)


def test_val_split_is_seeded_stratified_and_uses_eval_transform():
    bundle = build_data(val_split=0.2, seed=1)
    assert (len(bundle.train), len(bundle.val)) == (1149, 288)
    counts = collections.Counter(bundle.val.targets)
    assert max(counts.values()) - min(counts.values()) <= 2  # every class in proportion
    assert bundle.val.transform is bundle.eval_transform() and bundle.train.transform is bundle.train_transform()
    assert torch.equal(bundle.val[0][0], bundle.val[0][0])  # deterministic
    assert build_data(val_split=0.2, seed=1).val.targets == bundle.val.targets
    assert build_data(val_split=0.2, seed=2).val.targets != bundle.val.targets
    assert len(build_data(val_split=100).val) == 100
    with pytest.raises(ConfigError):
        build_data(val_split=5000)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="augment"):
        build_data(augment="fancy")
    with pytest.raises(ConfigError, match="auto_augment"):
        build_data(auto_augment="bogus")
    with pytest.raises(ConfigError, match="mean/std"):
        build_data(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))  # digits have one channel
    with pytest.raises(DataError, match="dataset not found"):
        build_data("no-such-dataset")
    custom = build_data(mean=(0.5,), std=(0.25,), augment="none")
    assert custom.mean == (0.5,) and custom.augment == "none"


@pytest.mark.parametrize("policy", ["trivialaugment", "autoaugment", "randaugment", "augmix"])
def test_auto_augment_policies_run(policy):
    bundle = build_data(auto_augment=policy, random_erasing=0.5, image_size=32)
    assert bundle.train[3][0].shape == (1, 32, 32)


def test_imagenet_and_eval_transforms_on_pil_and_tensors():
    photo = Image.new("RGB", (120, 90), (120, 30, 200))
    train = imagenet_train_transform(64, auto_augment="ta", random_erasing=1.0)
    assert train(photo).shape == (3, 64, 64)
    center = eval_transform(64, crop_pct=0.875)
    assert center(photo).shape == (3, 64, 64)
    assert torch.allclose(center(photo), center(pil_to_tensor(photo)))  # PIL and uint8 tensors agree
    assert eval_transform(64, ten_crop=True)(photo).shape == (10, 3, 64, 64)
    with pytest.raises(ConfigError):
        eval_transform(64, crop_pct=1.5)


def test_ten_crop_takes_distinct_crops_and_mirrors_only_flipped_data():
    image = torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8)
    single = eval_transform(16, (0.5,), (0.25,), crop_pct=1.0, source_size=16)(image)
    crops = eval_transform(16, (0.5,), (0.25,), crop_pct=1.0, ten_crop=True, source_size=16)(image)
    assert crops.shape == (10, 1, 16, 16)
    assert torch.equal(crops[4], single)  # the center crop is the single-crop view
    assert len({c.numpy().tobytes() for c in crops[:5]}) == 5  # four corners of the padded image + center
    mirrored = {c.flip(-1).numpy().tobytes() for c in crops[:5]}
    assert {c.numpy().tobytes() for c in crops[5:]} == mirrored  # and their mirror images
    unflipped = eval_transform(16, (0.5,), (0.25,), crop_pct=1.0, ten_crop=True, hflip=False, source_size=16)
    assert torch.equal(unflipped(image), crops[:5])
    assert build_data(augment="none", ten_crop=True).test[0][0].shape == (5, 1, 16, 16)  # digits: no flips


def _zip(path, members: dict[str, bytes | None]):
    """A zip archive; ``None`` members are (empty) folders."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            if data is None:
                archive.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
            else:
                archive.writestr(name, data)
    return path


def _tar(path, members: dict[str, bytes | None]):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name.rstrip("/"))
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def _png(value: int = 100, size: int = 8) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("pack", [_zip, _tar], ids=["zip", "tar.gz"])
def test_class_folders_without_images_are_errors_in_archives_too(tmp_path, pack):
    suffix = ".zip" if pack is _zip else ".tar.gz"
    empty = pack(tmp_path / f"empty{suffix}", {"pets/train/cat/0.png": _png(), "pets/train/dog/": None})
    with pytest.raises(DataError, match=r"class folder pets/train/dog in .*empty.* has no images"):
        build_data(empty)
    texts = pack(tmp_path / f"texts{suffix}", {"train/cat/0.png": _png(), "train/dog/notes.txt": b"hi",
                                               "train/dog/list.csv": b"a,b"})  # fmt: skip
    with pytest.raises(DataError, match=r"class folder train/dog .*only 2 other file\(s\) \(list.csv, notes.txt\)"):
        build_data(texts)


def test_select_classes_keeps_those_classes_relabelled_in_order():
    bundle = build_data()
    few = bundle.select_classes(["7", "2"], train_per_class=5, eval_per_class=3)
    assert few.classes == ["7", "2"] and few.num_classes == 2
    assert collections.Counter(few.train.targets) == {0: 5, 1: 5}
    assert collections.Counter(few.test.targets) == {0: 3, 1: 3}
    # the first five sevens of train, in order, now labelled 0; the images are the same
    sevens = [i for i, t in enumerate(bundle.train.targets) if t == 7][:5]
    assert torch.equal(few.train.images[[i for i, t in enumerate(few.train.targets) if t == 0]],
                       bundle.train.images[sevens])  # fmt: skip
    assert few.train.transform is bundle.train.transform and len(bundle.train) == 1437  # a view
    assert len(bundle.select_classes(["0"]).train) == collections.Counter(bundle.train.targets)[0]
    for bad in (["7", "seven"], ["7", "7"], []):
        with pytest.raises(ConfigError, match="select_classes needs distinct class names"):
            bundle.select_classes(bad)


def test_select_classes_of_photos_decoded_per_item(tmp_path):
    for label, value in (("ant", 40), ("bee", 120), ("wasp", 200)):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (80, 80), (value, i, 0)).save(tmp_path / "train" / label / f"{i}.png")
    wasps_and_ants = build_data(tmp_path, image_size=96).select_classes(["wasp", "ant"], train_per_class=2)
    assert type(wasps_and_ants.train).__name__ == "LazyImageDataset"
    assert wasps_and_ants.train.targets == [1, 1, 0, 0] and wasps_and_ants.classes == ["wasp", "ant"]
    assert [wasps_and_ants.train.get_image(i).getpixel((0, 0))[0] for i in range(4)] == [40, 40, 200, 200]
    assert wasps_and_ants.train.subset([3, 0]).targets == [0, 1]  # relabelled samples carry over


def test_class_folder_of_only_other_files_and_an_empty_root_are_clear_errors(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "cat" / "0.png")
    (tmp_path / "data" / "dog" / "readme.md").write_text("no pictures here")
    with pytest.raises(DataError, match=r"class folder dog in .* has no images, only 1 other file\(s\) \(readme.md\)"):
        build_data(tmp_path / "data")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"no images found in .*nothing: expected"):
        build_data(tmp_path / "nothing")


def test_an_unreadable_first_image_is_skipped_not_fatal(tmp_path):
    for label in ("ant", "bee"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "train" / label / f"{i}.png").write_bytes(_png(60 * i + 10))
    (tmp_path / "train" / "ant" / "0.png").write_bytes(b"not a png")  # the alphabetically first image
    with pytest.warns(UserWarning, match=r"skipped 1 files: .*ant/0\.png"):
        bundle = build_data(tmp_path)
    assert len(bundle.train) == 5 and bundle.image_size == 8
    for name in ("ant/1.png", "ant/2.png", "bee/0.png", "bee/1.png", "bee/2.png"):
        (tmp_path / "train" / name).write_bytes(b"broken too")
    with pytest.raises(DataError, match=r"none of the images in .* could be read"):
        build_data(tmp_path, cache=False)


def test_mixup_cutmix_on_a_batch():
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 4
    mix = mixup_cutmix(4)
    mixed, soft = mix(images, labels)
    assert mixed.shape == images.shape and soft.shape == (8, 4)
    assert torch.allclose(soft.sum(1), torch.ones(8))
    assert mixup_cutmix(4, mixup_alpha=0, cutmix_alpha=0) is None
    assert build_data().mixup_cutmix(cutmix_alpha=0) is not None


def test_summary_is_plain_data():
    summary = build_data(val_split=0.1).summary()
    assert summary["splits"] == {"train": 1293, "val": 144, "test": 360}
    assert summary["image_size"] == 16 and summary["in_chans"] == 1


def test_hymenoptera_zip(shared_file):
    with pytest.warns(UserWarning, match=r"imageNotFound\.gif"):
        bundle = build_data(shared_file("data/hymenoptera.zip"), image_size=64)
    assert bundle.classes == ["ants", "bees"] and bundle.augment == "cifar"
    assert (len(bundle.train), len(bundle.val), bundle.test) == (244, 153, None)  # 124 + 121 - the gif
    assert bundle.skipped == ["hymenoptera_data/train/ants/imageNotFound.gif (not an image extension)"]
    assert collections.Counter(bundle.val.targets) == {0: 70, 1: 83}
    for index in (0, 100, 243):
        image, label = bundle.train[index]
        assert image.shape == (3, 64, 64) and label in (0, 1)
    photo = bundle.val.get_image(7)
    assert photo.mode == "RGB" and min(photo.size) > 64  # a lazily decoded photo
    pickle.loads(pickle.dumps(bundle.val))[0]  # workers started with "spawn" get a working copy
    with pytest.warns(UserWarning, match=r"imageNotFound\.gif"):
        assert build_data(shared_file("data/hymenoptera.zip")).image_size == 224


@pytest.mark.slow
def test_cifar10_jpeg_handful(shared_file):
    store = open_store(shared_file("data/cifar10-jpeg.tar.xz"))
    index = index_image_folder(store.names, where="cifar10-jpeg")
    assert index.classes == list(CIFAR10_CLASSES) and index.skipped == []
    assert (len(index.splits["train"]), len(index.splits["test"])) == (50000, 10000)
    for name, target in index.splits["test"][::2500]:
        assert name.split("/")[2] == CIFAR10_CLASSES[target]
        with store.open(name) as stream:
            image = load_image(stream, name=store.describe(name))
        assert image.size == (32, 32) and image.mode == "RGB"


@pytest.mark.slow
def test_cifar10_jpeg_full_cache(shared_file, tmp_path):
    source = shared_file("data/cifar10-jpeg.tar.xz")
    start = time.perf_counter()
    bundle = build_data(source)
    decode_seconds = time.perf_counter() - start
    assert bundle.classes == list(CIFAR10_CLASSES) and bundle.augment == "cifar" and bundle.image_size == 32
    assert (len(bundle.train), len(bundle.test)) == (50000, 10000)
    assert collections.Counter(bundle.train.targets) == dict.fromkeys(range(10), 5000)
    assert bundle.train.images.shape == (50000, 3, 32, 32) and bundle.train.images.dtype == torch.uint8
    start = time.perf_counter()
    again = build_data(source, val_split=5000)  # the paper's 45k/5k split, from the cache
    cached_seconds = time.perf_counter() - start
    assert (len(again.train), len(again.val), len(again.test)) == (45000, 5000, 10000)
    assert cached_seconds < 10
    print(f"\ncifar10-jpeg: decode+cache {decode_seconds:.1f} s, load from cache {cached_seconds:.2f} s")
