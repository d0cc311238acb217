"""Map-style datasets yielding ``(transform(image), int label)``, in memory or decoded per item.

Both kinds expose ``targets`` (list of int) and ``classes`` like torchvision's datasets, and make cheap
views: ``subset(indices)`` for a held-out split, ``select_classes(keep, per_class)`` for a few-shot
subset of some classes, and ``with_transform(t)`` so a validation split carved
out of the training images gets the evaluation transform.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset

from resnetlab.data.images import load_image
from resnetlab.data.stores import FileStore
from resnetlab.errors import ConfigError

Transform = Callable[[Any], Any]
_D = TypeVar("_D", bound="ImageDataset")


class ImageDataset(Dataset):
    """Common API of the datasets built by :func:`resnetlab.data.build_data`."""

    classes: list[str]
    targets: list[int]
    transform: Transform | None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.get_image(index)
        return (self.transform(image) if self.transform else image), self.targets[index]

    def get_image(self, index: int) -> Any:
        """The untransformed image (uint8 tensor or PIL image)."""
        raise NotImplementedError

    def with_transform(self: _D, transform: Transform | None) -> _D:
        view = copy.copy(self)
        view.transform = transform
        return view

    def subset(self: _D, indices: Sequence[int]) -> _D:
        raise NotImplementedError

    def select_classes(self: _D, keep: Sequence[int], per_class: int | None = None) -> _D:
        """A view of the images of classes ``keep`` only (the first ``per_class`` of each, in dataset
        order, when given), relabelled ``0..len(keep)-1`` in the order of ``keep``."""
        new_label = {old: new for new, old in enumerate(keep)}
        counts = dict.fromkeys(keep, 0)
        indices = []
        for i, target in enumerate(self.targets):
            if target in counts and (per_class is None or counts[target] < per_class):
                counts[target] += 1
                indices.append(i)
        view = self.subset(indices)
        view._relabel([new_label[t] for t in view.targets], [self.classes[c] for c in keep])
        return view

    def _relabel(self, targets: list[int], classes: list[str]) -> None:
        self.targets, self.classes = targets, classes

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes)"


class TensorImageDataset(ImageDataset):
    """Images held in one uint8 tensor ``(N, C, H, W)``: no decoding during training."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int] | torch.Tensor, classes: Sequence[str],
                 transform: Transform | None = None) -> None:  # fmt: skip
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(targets):
            raise ValueError("images must be a uint8 (N, C, H, W) tensor with one target per image")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform

    def get_image(self, index: int) -> torch.Tensor:
        return self.images[index]

    def subset(self, indices: Sequence[int]) -> TensorImageDataset:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return TensorImageDataset(self.images[index], [self.targets[i] for i in index.tolist()],
                                  self.classes, self.transform)  # fmt: skip


class LazyImageDataset(ImageDataset):
    """Image files decoded with :func:`load_image` when indexed (photos of arbitrary size)."""

    def __init__(self, store: FileStore, samples: Sequence[tuple[str, int]], classes: Sequence[str],
                 transform: Transform | None = None, mode: str = "RGB") -> None:  # fmt: skip
        self.store = store
        self.samples = list(samples)
        self.targets = [target for _, target in self.samples]
        self.classes = list(classes)
        self.transform = transform
        self.mode = mode

    def get_image(self, index: int) -> Any:
        name = self.samples[index][0]
        with self.store.open(name) as stream:
            return load_image(stream, self.mode, name=self.store.describe(name))

    def subset(self, indices: Sequence[int]) -> LazyImageDataset:
        return LazyImageDataset(self.store, [self.samples[i] for i in indices], self.classes,
                                self.transform, self.mode)  # fmt: skip

    def _relabel(self, targets: list[int], classes: list[str]) -> None:
        super()._relabel(targets, classes)
        self.samples = [(name, target) for (name, _), target in zip(self.samples, targets)]


def stratified_split(targets: Sequence[int], held_out: float | int, *, seed: int = 0) -> tuple[list[int], list[int]]:
    """Seeded, class-stratified ``(kept, held_out)`` index lists; ``held_out`` is a fraction in (0, 1)
    or a count (e.g. 5000 for the ResNet paper's 45k/5k CIFAR-10 split)."""
    from sklearn.model_selection import train_test_split

    size: float | int = held_out if 0 < held_out < 1 else int(held_out)
    if size <= 0 or (isinstance(size, int) and size >= len(targets)):
        raise ConfigError(f"val_split must be a fraction in (0, 1) or a count below {len(targets)}, got {held_out}")
    indices = list(range(len(targets)))
    try:
        kept, held = train_test_split(indices, test_size=size, random_state=seed, stratify=list(targets))
    except ValueError as err:  # a class too small to stratify, or a split too small to hold every class
        raise ConfigError(f"cannot hold out {held_out} of {len(targets)} images by class: {err}") from err
    return sorted(kept), sorted(held)
