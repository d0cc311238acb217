"""Stems: what turns the image into the first feature map.

- ``imagenet``: 7x7/2 conv, norm, ReLU, 3x3/2 max-pool (the paper; total stride 4).
- ``deep``: three 3x3 convs, the first strided (ResNet-C, Bag of Tricks), then max-pool. Laid out as timm
  lays it out (``conv1`` is a Sequential, ``bn1`` follows) so timm's resnet*d weights load unchanged.
- ``deep_tiered``: the same with 24-32-64 channels instead of 32-32-64 (timm's "T" ResNets).
- ``cifar``: one 3x3/1 conv, no pooling (the paper's CIFAR nets; total stride 1).

The pooling after the stem (``stem_pool``): ``max`` (3x3/2 max-pool), ``conv`` (a 3x3/2 conv-norm-ReLU,
ResNet-RS) or ``bit`` (zero-pad 1 then an unpadded 3x3/2 max-pool: BiT's approximation of TF "SAME").
With anti-aliasing the max-pool becomes a stride-1 max-pool then a blur-pool, or a 2x2 average pool.

Pre-activation nets omit the norm and ReLU after the stem: the first block normalises its input.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models.layers import ANTI_ALIAS, BlurPool2d, ConvLayer, NormLayer, conv3x3

StemKind = Literal["imagenet", "deep", "deep_tiered", "cifar"]
STEM_STRIDE: dict[str, int] = {"imagenet": 4, "deep": 4, "deep_tiered": 4, "cifar": 1}
STEM_POOLS = ("max", "conv", "bit")
# The anti-aliased max-pool of timm: "avg" replaces it by a 2x2 average pool, "blur" by max(stride 1) + blur.
ANTI_ALIASED_MAX_POOL = {
    "avg": lambda channels: nn.AvgPool2d(2),
    "blur": lambda channels: nn.Sequential(nn.MaxPool2d(3, 1, padding=1), BlurPool2d(channels, 2)),
}


def make_stem(
    kind: StemKind,
    in_chans: int,
    channels: int,
    norm_layer: NormLayer,
    preact: bool,
    *,
    conv: ConvLayer = nn.Conv2d,
    pool: str = "max",
    anti_alias: str = "none",
) -> dict:
    """The stem's modules by torchvision/timm attribute name: conv1, [bn1, relu], maxpool."""
    if kind == "imagenet":
        conv1: nn.Module = conv(in_chans, channels, 7, 2, padding=3, bias=False)
    elif kind in ("deep", "deep_tiered"):
        mid = channels // 2
        first = 3 * (mid // 4) if kind == "deep_tiered" else mid
        conv1 = nn.Sequential(
            conv3x3(in_chans, first, 2, conv=conv),
            norm_layer(first),
            nn.ReLU(inplace=True),
            conv3x3(first, mid, conv=conv),
            norm_layer(mid),
            nn.ReLU(inplace=True),
            conv3x3(mid, channels, conv=conv),
        )
    elif kind == "cifar":
        conv1 = conv(in_chans, channels, 3, 1, padding=1, bias=False)
    else:
        raise ConfigError(f"unknown stem {kind!r}; choose one of {sorted(STEM_STRIDE)}")
    modules: dict[str, nn.Module] = {"conv1": conv1}
    if not preact:
        modules["bn1"] = norm_layer(channels)
        modules["relu"] = nn.ReLU(inplace=True)
    modules["maxpool"] = nn.Identity() if kind == "cifar" else _stem_pool(pool, channels, norm_layer, conv, anti_alias)
    return modules


def _stem_pool(pool: str, channels: int, norm_layer: NormLayer, conv: ConvLayer, anti_alias: str) -> nn.Module:
    """The stride-2 reduction after the stem conv (see the module docstring)."""
    if pool == "max":
        return ANTI_ALIASED_MAX_POOL[anti_alias](channels) if anti_alias != "none" else nn.MaxPool2d(3, 2, padding=1)
    if pool == "conv":  # ResNet-RS; with anti-aliasing the conv keeps stride 1 and the filter subsamples
        aa = ANTI_ALIAS[anti_alias]
        layers = [conv3x3(channels, channels, 1 if aa else 2, conv=conv), *([aa(channels, 2)] if aa else [])]
        return nn.Sequential(*layers, norm_layer(channels), nn.ReLU(inplace=True))
    if pool == "bit":
        return nn.Sequential(nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2))
    raise ConfigError(f"unknown stem_pool {pool!r}; choose one of {STEM_POOLS}")
