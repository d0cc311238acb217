"""Stems: what turns the image into the first feature map.

- ``imagenet``: 7x7/2 conv, norm, ReLU, 3x3/2 max-pool (the paper; total stride 4).
- ``deep``: three 3x3 convs, the first strided (ResNet-C, Bag of Tricks), then max-pool. Laid out as timm
  lays it out (``conv1`` is a Sequential, ``bn1`` follows) so timm's resnet*d weights load unchanged.
- ``cifar``: one 3x3/1 conv, no pooling (the paper's CIFAR nets; total stride 1).

Pre-activation nets omit the norm and ReLU after the stem: the first block normalises its input.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models.layers import NormLayer

StemKind = Literal["imagenet", "deep", "cifar"]
STEM_STRIDE: dict[str, int] = {"imagenet": 4, "deep": 4, "cifar": 1}


def make_stem(kind: StemKind, in_chans: int, channels: int, norm_layer: NormLayer, preact: bool) -> dict:
    """The stem's modules by torchvision/timm attribute name: conv1, [bn1, relu], maxpool."""
    if kind == "imagenet":
        conv1: nn.Module = nn.Conv2d(in_chans, channels, 7, 2, padding=3, bias=False)
    elif kind == "deep":
        mid = channels // 2
        conv1 = nn.Sequential(
            nn.Conv2d(in_chans, mid, 3, 2, padding=1, bias=False),
            norm_layer(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, 1, padding=1, bias=False),
            norm_layer(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, channels, 3, 1, padding=1, bias=False),
        )
    elif kind == "cifar":
        conv1 = nn.Conv2d(in_chans, channels, 3, 1, padding=1, bias=False)
    else:
        raise ConfigError(f"unknown stem {kind!r}; choose one of {sorted(STEM_STRIDE)}")
    modules: dict[str, nn.Module] = {"conv1": conv1}
    if not preact:
        modules["bn1"] = norm_layer(channels)
        modules["relu"] = nn.ReLU(inplace=True)
    modules["maxpool"] = nn.MaxPool2d(3, 2, padding=1) if kind != "cifar" else nn.Identity()
    return modules
