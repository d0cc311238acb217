"""The three shortcut options of He et al. (2015), Sec. 4.1, plus "none" for plain nets.

- **A**: parameter-free. Where the shape changes, subsample the input by the stride and zero-pad the new
  channels (equally on both sides, as the published CIFAR implementation does); identity elsewhere.
- **B**: identity where shapes match, a 1x1 projection (conv + norm) where they change.
- **C**: a projection on every block.
- **none**: no shortcut at all: the "plain" twin used in the degradation experiment.

ResNet-D (Bag of Tricks) replaces the strided 1x1 projection by ``avgpool(2) -> 1x1 conv`` so that the
projection sees every input pixel; the module layout follows timm so its weights load unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models.layers import ConvLayer, NormLayer, conv1x1

ShortcutKind = Literal["A", "B", "C", "none"]
SHORTCUT_KINDS = ("A", "B", "C", "none")


class ZeroPadShortcut(nn.Module):
    """Option A: ``x[:, :, ::s, ::s]`` then zero channels appended before and after."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ConfigError(
                f"option-A shortcuts cannot reduce channels ({in_channels} -> {out_channels}); "
                "use shortcut='B' or widths that do not shrink"
            )
        self.stride = stride
        self.pad_front = (out_channels - in_channels) // 2
        self.pad_back = out_channels - in_channels - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_front}, {self.pad_back})"


def make_shortcut(
    kind: ShortcutKind,
    in_channels: int,
    out_channels: int,
    stride: int,
    norm_layer: NormLayer,
    *,
    avg_down: bool = False,
    preact: bool = False,
    conv: ConvLayer = nn.Conv2d,
) -> nn.Module | None:
    """The module on the shortcut path, or ``None`` for the identity (or for no shortcut at all)."""
    if kind not in SHORTCUT_KINDS:
        raise ConfigError(f"unknown shortcut {kind!r}; choose one of {SHORTCUT_KINDS}")
    shape_changes = stride != 1 or in_channels != out_channels
    if kind == "none" or (kind in ("A", "B") and not shape_changes):
        return None
    if kind == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    # Projection (B where the shape changes, C everywhere). Pre-activation nets project the already
    # normalised input, so the projection carries no norm of its own.
    norm = [] if preact else [norm_layer(out_channels)]
    if avg_down:
        pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        return nn.Sequential(pool, conv1x1(in_channels, out_channels, conv=conv), *norm)
    return nn.Sequential(conv1x1(in_channels, out_channels, stride, conv=conv), *norm)
