"""``build_data``: the one entry point from a dataset name or path to ready-to-train splits."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resnetlab.data.cache import cache_file_for, decode_all, load_cache, save_cache
from resnetlab.data.cifar import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CifarLayout,
    find_cifar_layout,
    locate_or_download_cifar,
    read_cifar,
)
from resnetlab.data.datasets import ImageDataset, LazyImageDataset, TensorImageDataset, stratified_split
from resnetlab.data.digits import DIGITS_CLASSES, DIGITS_IMAGE_SIZE, load_digits
from resnetlab.data.folders import FolderIndex, drop_unreadable, index_image_folder, warn_skipped
from resnetlab.data.images import probe_image
from resnetlab.data.stores import ARCHIVE_SUFFIXES, FileStore, open_store
from resnetlab.data.transforms import (
    cifar_train_transform,
    eval_transform,
    imagenet_train_transform,
    mixup_cutmix,
)
from resnetlab.errors import ConfigError, DataError
from resnetlab.models.config import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from resnetlab.paths import cache_dir

#: Images at most this many pixels on a side are "small": decoded once into a uint8 cache, CIFAR recipe.
SMALL_IMAGE_MAX = 64
#: Default input size for photo datasets decoded lazily.
PHOTO_IMAGE_SIZE = 224
AUGMENTS = ("auto", "cifar", "imagenet", "none")


@dataclass
class DataBundle:
    """Train/val/test splits of one dataset and how to feed them to a model.

    Each split yields ``(float tensor (C, H, W) normalised with mean/std, int label)`` and has
    ``.targets`` and ``.classes``; ``val`` and ``test`` use :meth:`eval_transform`.
    """

    name: str
    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset | None
    classes: list[str]
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"  # the training recipe actually used: "cifar", "imagenet" or "none"
    eval_size: int | None = None  # the side val/test images are cropped to, when not image_size (the train crop)
    hflip: bool = True  # whether training flips images horizontally (not for digits)
    skipped: list[str] = field(default_factory=list)  # files reported and left out, with the reason
    train_tf: Callable[[Any], torch.Tensor] | None = field(default=None, repr=False)
    eval_tf: Callable[[Any], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_transform(self) -> Callable[[Any], torch.Tensor]:
        """The augmenting transform of the train split (PIL image or uint8 tensor in)."""
        return self.train_tf or self.eval_transform()

    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """The deterministic transform of val/test; use it on images given to a trained model."""
        return self.eval_tf or eval_transform(self.image_size, self.mean, self.std, crop_pct=1.0)

    def mixup_cutmix(self, *, mixup_alpha: float = 0.2, cutmix_alpha: float = 1.0):
        """Batch-level ``(images, labels) -> (images, soft labels)`` for this dataset's classes."""
        return mixup_cutmix(self.num_classes, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)

    def select_classes(self, classes: Sequence[str], *, train_per_class: int | None = None,
                       eval_per_class: int | None = None) -> DataBundle:  # fmt: skip
        """The same dataset restricted to ``classes`` (relabelled in that order): e.g. a few-shot target
        task, or disjoint class sets for pretraining and transfer. ``train_per_class`` /
        ``eval_per_class``: keep only the first N images of each class of train / of val and test."""
        unknown = [c for c in classes if c not in self.classes]
        if unknown or len(set(classes)) != len(classes) or not classes:
            raise ConfigError(f"select_classes needs distinct class names of {self.name}, got {list(classes)}"
                              f"{f' ({unknown} unknown)' if unknown else ''}; its classes: {self.classes}")  # fmt: skip
        keep = [self.classes.index(c) for c in classes]

        def select(split: ImageDataset | None, per_class: int | None) -> ImageDataset | None:
            return split.select_classes(keep, per_class) if split is not None else None

        return dataclasses.replace(
            self, classes=list(classes), train=select(self.train, train_per_class),
            val=select(self.val, eval_per_class), test=select(self.test, eval_per_class),
        )  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """Plain-data description (for logs and ``--json``)."""
        sizes = {s: len(d) for s, d in (("train", self.train), ("val", self.val), ("test", self.test)) if d}
        return {
            "name": self.name, "num_classes": self.num_classes, "classes": self.classes, "splits": sizes,
            "in_chans": self.in_chans, "image_size": self.image_size, "mean": list(self.mean),
            "std": list(self.std), "augment": self.augment, "skipped": self.skipped,
        }  # fmt: skip


@dataclass
class _Loaded:
    """A dataset as read from its source, before transforms and the held-out split."""

    name: str
    splits: dict[str, ImageDataset]
    classes: list[str]
    in_chans: int
    native_size: int | None = None  # side of every image when they all share one size
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    hflip: bool = True
    skipped: list[str] = field(default_factory=list)


def build_data(
    source: str | os.PathLike | None = None,
    *,
    augment: str = "auto",
    image_size: int | None = None,
    val_split: float | int = 0,
    seed: int = 0,
    download: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    auto_augment: str | None = None,
    random_erasing: float = 0.0,
    crop_pct: float | None = None,
    eval_image_size: int | None = None,
    interpolation: str = "bilinear",
    ten_crop: bool = False,
    cache: bool | None = None,
    follow_symlinks: bool = False,
    check_images: bool = True,
    mode: str = "RGB",
    root: str | os.PathLike | None = None,
) -> DataBundle:
    """Load ``source`` and return its splits with transforms attached.

    source: ``None``/``"digits"`` (bundled with scikit-learn), ``"cifar10"``/``"cifar100"`` (from ``root``,
        default ``cache_dir()/datasets``; ``download=True`` fetches the official archive), or a path: a
        ``cifar-10-batches-py``/``cifar-100-python`` folder or official ``.tar.gz``, an ImageFolder
        directory, or an ImageFolder inside a .zip/.tar/.tar.gz/.tar.xz archive.
    augment: ``"auto"`` = ``"cifar"`` (pad + crop + flip) up to 64 px, ``"imagenet"`` (RandomResizedCrop
        + flip) above; ``"none"`` trains on the eval transform.
    image_size: input side; default the images' own size (digits: 16), 224 for photos.
    val_split: hold out a seeded, class-stratified fraction (0.1) or count (5000) of train as ``val``.
    mean, std: normalisation; default the dataset's own statistics (ImageNet's for photos).
    auto_augment: "trivialaugment" | "autoaugment" | "randaugment" | "augmix" on the train split.
    random_erasing: probability of RandomErasing on the train split.
    crop_pct, ten_crop: eval resize = eval size / crop_pct (default 1 for small images, 0.875 for photos)
        then center crop, or the paper's ten crops stacked as ``(10, C, H, W)`` (five when the data is
        not flipped in training, as digits; see ``eval_transform``).
    eval_image_size: the val/test crop when it differs from the train crop ``image_size`` (torchvision's
        recipe trains at 176 and evaluates at 224, "FixRes" effect: Touvron et al. 2019).
    interpolation: "bilinear" or "bicubic", of the random-resized crop, the policies and the eval resize.
    cache: decode into a uint8 tensor cache (default: when images are <= 64 px); False decodes per item.
    follow_symlinks: follow symlinks leading out of an ImageFolder directory.
    check_images: for per-item decoding, probe every header at index time and skip unreadable files.
    mode: PIL mode images are converted to ("RGB" or "L"; digits are always "L").
    """
    loaded = _load_source(source, _Request(image_size=image_size, download=download, cache=cache,
                                           follow_symlinks=follow_symlinks, check_images=check_images, mode=mode,
                                           root=Path(root) if root else cache_dir() / "datasets"))  # fmt: skip
    warn_skipped(loaded.skipped, str(source or loaded.name), stacklevel=2)
    size = image_size or loaded.native_size or PHOTO_IMAGE_SIZE
    mean, std = _normalisation(loaded, mean, std)
    recipe = augment.lower()
    if recipe not in AUGMENTS:
        raise ConfigError(f"unknown augment {augment!r}; choose one of {', '.join(AUGMENTS)}")
    if recipe == "auto":
        recipe = "cifar" if size <= SMALL_IMAGE_MAX else "imagenet"
    # every image of a tensor dataset has the native size, so resizing to it can be left out
    native = loaded.native_size if all(isinstance(d, TensorImageDataset) for d in loaded.splits.values()) else None
    eval_size = eval_image_size or size
    eval_tf = eval_transform(eval_size, mean, std, ten_crop=ten_crop, hflip=loaded.hflip, source_size=native,
                             crop_pct=crop_pct or (1.0 if eval_size <= SMALL_IMAGE_MAX else 0.875),
                             interpolation=interpolation)  # fmt: skip
    if recipe == "none":
        train_tf = eval_transform(size, mean, std, crop_pct=crop_pct or 1.0, source_size=native)
    elif recipe == "cifar":
        train_tf = cifar_train_transform(size, mean, std, hflip=loaded.hflip, auto_augment=auto_augment,
                                         random_erasing=random_erasing, source_size=native)  # fmt: skip
    else:
        train_tf = imagenet_train_transform(size, mean, std, hflip=loaded.hflip, auto_augment=auto_augment,
                                            random_erasing=random_erasing, interpolation=interpolation)  # fmt: skip

    splits = loaded.splits
    if "train" not in splits:
        raise DataError(f"{loaded.name} has no train split (found: {', '.join(sorted(splits))})")
    train, val = splits["train"], splits.get("val")
    if val_split:
        if val is not None:
            raise ConfigError(f"{loaded.name} already has a val split; drop val_split or remove that folder")
        kept, held = stratified_split(train.targets, val_split, seed=seed)
        train, val = train.subset(kept), train.subset(held)
    test = splits.get("test")
    return DataBundle(
        name=loaded.name,
        train=train.with_transform(train_tf),
        val=val.with_transform(eval_tf) if val is not None else None,
        test=test.with_transform(eval_tf) if test is not None else None,
        classes=loaded.classes, in_chans=loaded.in_chans, image_size=size, mean=mean, std=std,
        augment=recipe, eval_size=eval_image_size if eval_image_size != size else None, hflip=loaded.hflip,
        skipped=loaded.skipped, train_tf=train_tf, eval_tf=eval_tf,
    )  # fmt: skip


def _normalisation(loaded: _Loaded, mean: Sequence[float] | None,
                   std: Sequence[float] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:  # fmt: skip
    """User values, else the dataset's statistics, else ImageNet's (averaged for 1-channel images)."""
    if loaded.mean is not None and loaded.std is not None:
        default_mean, default_std = loaded.mean, loaded.std
    elif loaded.in_chans == 1:
        default_mean, default_std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    else:
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    result = tuple(float(v) for v in (mean or default_mean)), tuple(float(v) for v in (std or default_std))
    if any(len(v) != loaded.in_chans for v in result) or min(result[1]) <= 0:
        raise ConfigError(f"mean/std need {loaded.in_chans} values (std > 0) for {loaded.name}, got {result}")
    return result


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of a uint8 ``(N, C, H, W)`` tensor (chunked: low memory)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.float64) / 255.0
        total += block.sum(dim=(0, 2, 3))
        squares += block.square().sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(1 / 255)  # constant channel: no 0/0
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


@dataclass(frozen=True)
class _Request:
    """What ``build_data`` asks of a source loader."""

    image_size: int | None
    download: bool
    cache: bool | None
    follow_symlinks: bool
    check_images: bool
    mode: str
    root: Path


def _load_source(source: str | os.PathLike | None, request: _Request) -> _Loaded:
    named = _named_dataset(source)
    if named is not None:
        return NAMED_DATASETS[named](named, request)
    path = Path(source).expanduser()  # type: ignore[arg-type]
    if not path.exists():
        raise DataError(
            f"dataset not found: {source!r} (use {', '.join(map(repr, NAMED_DATASETS))}, or the path of an "
            "ImageFolder directory, an archive of one, or a cifar-10-batches-py folder)"
        )
    tag = f"mode={request.mode}"
    if path.is_file() and request.cache is not False and (hit := load_cache(cache_file_for(path, tag=tag))):
        return _from_cache(*hit)
    store = open_store(path, follow_symlinks=request.follow_symlinks)
    for layout in STORE_LAYOUTS:
        if (loaded := layout(store, path, request)) is not None:
            return loaded
    raise DataError(f"no dataset layout recognised in {path}")  # (the ImageFolder layout accepts any store)


def _load_digits(name: str, request: _Request) -> _Loaded:
    size = request.image_size or DIGITS_IMAGE_SIZE
    splits = load_digits(size)
    mean, std = channel_stats(splits["train"].images)
    # hflip=False: a mirrored digit is not a digit
    return _Loaded("digits", dict(splits), DIGITS_CLASSES, 1, size, mean, std, hflip=False)


def _load_named_cifar(name: str, request: _Request) -> _Loaded:
    return _load_cifar(locate_or_download_cifar(name, request.root, download=request.download))


def _cifar_in_store(store: FileStore, path: Path, request: _Request) -> _Loaded | None:
    layout = find_cifar_layout(store.names)
    return _load_cifar(store, layout) if layout is not None else None


def _image_folder(store: FileStore, path: Path, request: _Request) -> _Loaded:
    """An ImageFolder: decoded once into the uint8 cache when its images are small, else per item."""
    index = index_image_folder(store.names, where=str(path), empty_dirs=getattr(store, "empty_dirs", ()))
    index.skipped += store.skipped
    first_side = _first_readable_side(store, index, where=str(path))
    small = first_side <= SMALL_IMAGE_MAX
    if request.cache or (request.cache is None and small):
        cache_file = cache_file_for(path, tag=f"mode={request.mode}")
        if path.is_dir() and (hit := load_cache(cache_file)):
            return _from_cache(*hit)
        tensors, metadata = _decode_folder(path, store, index, request.mode)
        if tensors is not None:
            save_cache(cache_file, tensors, metadata)
            return _from_cache(tensors, metadata)
    if request.check_images:
        drop_unreadable(index, store)
    splits = {s: LazyImageDataset(store, samples, index.classes, mode=request.mode)
              for s, samples in index.splits.items()}  # fmt: skip
    return _Loaded(_dataset_name(path), dict(splits), index.classes, len(request.mode),
                   native_size=first_side if small else None, skipped=index.skipped)  # fmt: skip


#: Datasets known by name (``build_data("cifar10")``): the one place to add one.
NAMED_DATASETS: dict[str, Callable[[str, _Request], _Loaded]] = {
    "digits": _load_digits, "cifar10": _load_named_cifar, "cifar100": _load_named_cifar,
}  # fmt: skip
#: Layouts recognised in a folder or archive, tried in order (the ImageFolder layout last: it takes any
#: store, and explains what it expected when nothing fits): the one place to add one.
STORE_LAYOUTS: tuple[Callable[[FileStore, Path, _Request], _Loaded | None], ...] = (_cifar_in_store, _image_folder)


def _first_readable_side(store: FileStore, index: FolderIndex, *, where: str) -> int:
    """The longer side of the first image whose header decodes (it decides the small-image path); an
    unreadable file is skipped here and reported with the others later."""
    errors: list[str] = []
    for samples in index.splits.values():
        for name, _ in samples:
            try:
                with store.open(name) as stream:
                    return max(probe_image(stream, name=store.describe(name)))
            except DataError as err:
                errors.append(str(err))
    raise DataError(f"none of the images in {where} could be read: {'; '.join(errors[:3])}")


def _dataset_name(path: Path) -> str:
    name = path.name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _named_dataset(source: str | os.PathLike | None) -> str | None:
    """The key of ``NAMED_DATASETS`` that ``source`` names ("digits" for None), unless it is an existing path."""
    if source is None:
        return "digits"
    if not isinstance(source, str) or Path(source).exists():
        return None
    key = source.lower().replace("-", "").replace("_", "")
    return key if key in NAMED_DATASETS else None


def _load_cifar(store: FileStore, layout: CifarLayout | None = None) -> _Loaded:
    layout = layout or find_cifar_layout(store.names)
    if layout is None:
        raise DataError(f"no CIFAR batches (batches.meta, data_batch_1..5, test_batch) in {store.describe('')}")
    classes, arrays = read_cifar(store, layout)
    splits = {s: TensorImageDataset(torch.from_numpy(x), y.tolist(), classes) for s, (x, y) in arrays.items()}
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if layout.name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return _Loaded(layout.name, dict(splits), classes, 3, 32, mean, std)


def _decode_folder(path: Path, store: FileStore, index: FolderIndex,
                   mode: str) -> tuple[dict[str, torch.Tensor] | None, dict]:  # fmt: skip
    """Decode every split into uint8 tensors (None if the images differ in size)."""
    tensors: dict[str, torch.Tensor] = {}
    unreadable: list[str] = []
    for split, samples in index.splits.items():
        decoded = decode_all(store, samples, mode)
        if decoded is None:
            warnings.warn(f"{path}: images differ in size, so they are decoded per item (no cache)", stacklevel=3)
            return None, {}
        images, targets, skipped = decoded
        tensors[f"{split}.images"], tensors[f"{split}.targets"] = torch.from_numpy(images), torch.from_numpy(targets)
        unreadable += skipped
    sizes = {tuple(t.shape[1:]) for k, t in tensors.items() if k.endswith(".images")}
    if len(sizes) != 1:
        warnings.warn(f"{path}: splits differ in image size, so they are decoded per item (no cache)", stacklevel=3)
        return None, {}
    index.skipped += unreadable
    reference = tensors.get("train.images", next(iter(tensors.values())))
    mean, std = channel_stats(reference)
    metadata = {"name": _dataset_name(path), "classes": index.classes, "skipped": index.skipped,
                "mean": mean, "std": std}  # fmt: skip
    return tensors, metadata


def _from_cache(tensors: dict[str, torch.Tensor], metadata: dict) -> _Loaded:
    classes = list(metadata["classes"])
    splits: dict[str, ImageDataset] = {}
    for key, images in tensors.items():
        if key.endswith(".images"):
            split = key.removesuffix(".images")
            splits[split] = TensorImageDataset(images, tensors[f"{split}.targets"], classes)
    first = next(iter(splits.values()))
    shape = first.images.shape  # type: ignore[attr-defined]
    skipped = list(metadata.get("skipped", []))
    return _Loaded(metadata["name"], splits, classes, shape[1], max(shape[-2:]),
                   tuple(metadata["mean"]), tuple(metadata["std"]), skipped=skipped)  # fmt: skip
