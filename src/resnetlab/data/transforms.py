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


#: ``interpolation=`` names -> torchvision's modes.
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


def auto_augment_transform(
    name: str | None,
    *,
    small_images: bool = False,
    interpolation: str | None = None,
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
) -> list[v2.Transform]:
    """The policy ``name`` (see AUTO_AUGMENT_NAMES); AutoAugment uses its CIFAR-10 policy on small images.
    ``interpolation``: of the geometric operations (None: the policy's default, nearest).

    A timm RandAugment spec (``rand-m7-mstd0.5-inc1``: magnitude 7 with noise of std 0.5, the ops whose
    strength increases with the magnitude; ResNet strikes back's) runs timm's own implementation, with the
    settings timm's ``create_transform`` gives it for ``image_size`` and ``mean``; it needs timm.
    """
    if name is None or name.lower() == "none":
        return []
    if name.lower().startswith("rand-"):
        return timm_rand_augment(name.lower(), image_size=image_size, mean=mean, interpolation=interpolation)
    policy = AUTO_AUGMENT_NAMES.get(name.lower())
    mode = {"interpolation": INTERPOLATIONS[interpolation]} if interpolation else {}
    if policy == "trivialaugment":
        return [v2.TrivialAugmentWide(**mode)]
    if policy == "autoaugment":
        which = v2.AutoAugmentPolicy.CIFAR10 if small_images else v2.AutoAugmentPolicy.IMAGENET
        return [v2.AutoAugment(which, **mode)]
    if policy == "randaugment":
        return [v2.RandAugment(**mode)]
    if policy == "augmix":
        return [v2.AugMix(**mode)]
    raise ConfigError(f"unknown auto_augment {name!r}; choose one of {sorted(set(AUTO_AUGMENT_NAMES.values()))} "
                      "or a timm RandAugment spec such as rand-m7-mstd0.5-inc1")  # fmt: skip


def timm_rand_augment(spec: str, *, image_size: int, mean: Sequence[float],
                      interpolation: str | None) -> list[v2.Transform]:  # fmt: skip
    """timm's RandAugment for ``spec`` on PIL images, between conversions from and to a tensor image."""
    try:
        from timm.data.auto_augment import rand_augment_transform
    except ImportError:
        raise ConfigError(f"auto_augment={spec!r} is timm's RandAugment: pip install 'resnetlab[train]' "
                          "(or timm)") from None  # fmt: skip
    hparams: dict[str, Any] = {"translate_const": int(image_size * 0.45),  # as timm's create_transform sets them
                               "img_mean": tuple(min(255, round(255 * m)) for m in mean)}  # fmt: skip
    if interpolation:
        from timm.data.transforms import str_to_pil_interp

        hparams["interpolation"] = str_to_pil_interp(interpolation)
    try:
        policy = rand_augment_transform(spec, hparams)
    except (AssertionError, ValueError, KeyError) as err:
        raise ConfigError(f"auto_augment={spec!r} is not a timm RandAugment spec (e.g. rand-m7-mstd0.5-inc1): "
                          f"{err}") from None  # fmt: skip
    return [v2.ToPILImage(), policy, v2.PILToTensor()]


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
    interpolation: str = "bilinear",
) -> v2.Compose:
    """ImageNet-style training: RandomResizedCrop, flip, optional auto-augment policy, RandomErasing; the
    crop and the policy's geometric operations resample with ``interpolation`` (as torchvision's reference)."""
    mode = INTERPOLATIONS[interpolation]
    steps: list[v2.Transform] = [v2.ToImage(), v2.RandomResizedCrop(image_size, scale=scale, interpolation=mode)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += auto_augment_transform(auto_augment, interpolation=interpolation, image_size=image_size, mean=mean)
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
    interpolation: str = "bilinear",
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
        steps += [RefuseHugeResize(side, max(MAX_RESIZED_PIXELS, 4 * side * side)),
                  v2.Resize(side, interpolation=INTERPOLATIONS[interpolation])]  # fmt: skip
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
