"""Training and evaluation transforms (torchvision.transforms.v2), plus batch-level MixUp/CutMix.

Every transform accepts a PIL image or a uint8 tensor ``(C, H, W)`` and returns a normalised float tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from resnetlab.data.images import ImageBoundsError
from resnetlab.errors import ConfigError
from resnetlab.models.config import IMAGENET_MEAN, IMAGENET_STD  # one definition, shared with the models

#: ``auto_augment=`` names (and aliases) -> policy.
AUTO_AUGMENT_NAMES = {
    "trivialaugment": "trivialaugment", "ta": "trivialaugment", "trivial": "trivialaugment",
    "autoaugment": "autoaugment", "aa": "autoaugment",
    "randaugment": "randaugment", "ra": "randaugment",
    "augmix": "augmix",
}  # fmt: skip


def auto_augment_transform(name: str | None, *, small_images: bool = False) -> list[v2.Transform]:
    """The policy ``name`` (see AUTO_AUGMENT_NAMES); AutoAugment uses its CIFAR-10 policy on small images."""
    if name is None or name.lower() == "none":
        return []
    policy = AUTO_AUGMENT_NAMES.get(name.lower())
    if policy == "trivialaugment":
        return [v2.TrivialAugmentWide()]
    if policy == "autoaugment":
        which = v2.AutoAugmentPolicy.CIFAR10 if small_images else v2.AutoAugmentPolicy.IMAGENET
        return [v2.AutoAugment(which)]
    if policy == "randaugment":
        return [v2.RandAugment()]
    if policy == "augmix":
        return [v2.AugMix()]
    raise ConfigError(f"unknown auto_augment {name!r}; choose one of {sorted(set(AUTO_AUGMENT_NAMES.values()))}")


def _to_normalized(mean: Sequence[float], std: Sequence[float], random_erasing: float = 0.0) -> list[v2.Transform]:
    steps = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    if random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing))
    return steps


def cifar_train_transform(
    image_size: int = 32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    padding: int | None = None,
    hflip: bool = True,
    auto_augment: str | None = None,
    random_erasing: float = 0.0,
    source_size: int | None = None,
) -> v2.Compose:
    """The ResNet paper's CIFAR recipe: zero-pad 4 (``image_size // 8``), random crop, horizontal flip.

    Images are first resized to ``image_size``, a step left out when ``source_size`` says they match.
    """
    steps: list[v2.Transform] = [v2.ToImage()]
    if source_size != image_size:
        steps.append(v2.Resize((image_size, image_size)))
    steps.append(v2.RandomCrop(image_size, padding=image_size // 8 if padding is None else padding))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += auto_augment_transform(auto_augment, small_images=True)
    return v2.Compose(steps + _to_normalized(mean, std, random_erasing))


def imagenet_train_transform(
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    auto_augment: str | None = None,
    random_erasing: float = 0.0,
) -> v2.Compose:
    """ImageNet-style training: RandomResizedCrop, flip, optional auto-augment policy, RandomErasing."""
    steps: list[v2.Transform] = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=scale)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += auto_augment_transform(auto_augment)
    return v2.Compose(steps + _to_normalized(mean, std, random_erasing))


#: Most pixels an image may have once ``eval_transform`` has resized its short side (200 MB as float RGB);
#: for models whose input is above 2,048 px, 4 times the square of the resized side.
MAX_RESIZED_PIXELS = 1 << 24


class RefuseHugeResize(torch.nn.Module):
    """Refuse, before ``Resize(short_side)`` allocates it, an image that would exceed ``max_pixels`` once its
    short side is resized (a thin strip grows its long side by the same factor as its short side)."""

    def __init__(self, short_side: int, max_pixels: int = MAX_RESIZED_PIXELS) -> None:
        super().__init__()
        self.short_side, self.max_pixels = short_side, max_pixels

    def forward(self, image: Any) -> Any:
        height, width = v2.functional.get_size(image)
        short, long = sorted((max(height, 1), max(width, 1)))
        resized = self.short_side * (self.short_side * long // short)
        if resized > self.max_pixels:
            raise ImageBoundsError(
                f"a {width}x{height} image would have {resized:,} pixels once resized to a short side of "
                f"{self.short_side}, more than the limit of {self.max_pixels:,}: crop it or use a smaller input size"
            )
        return image


class StackCrops(torch.nn.Module):
    """Turn the tuple of crops from ``TenCrop``/``FiveCrop`` into one ``(n_crops, C, H, W)`` tensor."""

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([c.as_subclass(torch.Tensor) for c in crops])


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    crop_pct: float = 0.875,
    ten_crop: bool = False,
    hflip: bool = True,
    source_size: int | None = None,
) -> v2.Compose:
    """Resize the shorter side to ``image_size / crop_pct``, then a center crop; both are left out when
    ``crop_pct=1`` and ``source_size == image_size``.

    ``ten_crop``: the paper's multi-crop test instead, stacked as ``(n_crops, C, H, W)``: the four corner
    crops and the center crop, plus their mirror images when the data trains with flips (``hflip``; digits
    do not, so they get the 5 unmirrored crops). Corner crops need a margin: with ``crop_pct < 1`` it is
    the resize margin; with ``crop_pct=1`` (small images) the image is zero-padded by ``image_size // 8``,
    the padding of the CIFAR training recipe, so the corners are its most shifted training crops.
    """
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")
    steps: list[v2.Transform] = [v2.ToImage()]
    if crop_pct != 1 or source_size != image_size:
        side = round(image_size / crop_pct)  # a model with a large input may resize to more than the default limit
        steps += [RefuseHugeResize(side, max(MAX_RESIZED_PIXELS, 4 * side * side)), v2.Resize(side)]
    if ten_crop:
        if crop_pct == 1:
            steps += [v2.CenterCrop(image_size), v2.Pad(image_size // 8)]
        steps.append(v2.TenCrop(image_size) if hflip else v2.FiveCrop(image_size))
    elif crop_pct != 1 or source_size != image_size:
        steps.append(v2.CenterCrop(image_size))
    steps += _to_normalized(mean, std)
    return v2.Compose(steps + ([StackCrops()] if ten_crop else []))


def mixup_cutmix(
    num_classes: int, *, mixup_alpha: float = 0.2, cutmix_alpha: float = 1.0
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """A batch transform ``(images, labels) -> (mixed images, soft labels (B, num_classes))`` that applies
    MixUp or CutMix (chosen at random per batch); None when both alphas are 0."""
    ops: list[v2.Transform] = []
    if mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
