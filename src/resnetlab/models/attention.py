"""Channel attention for the residual branch, and the selective-kernel convolution.

- ``se``: Squeeze-and-Excitation (Hu et al. 2018): global average pool, 1x1 reduce, ReLU, 1x1 expand,
  sigmoid gate per channel. ResNet-RS uses the same module with a reduction of 1/4 instead of 1/16.
- ``eca``: Efficient Channel Attention (Wang et al. 2020): the same gate from a 1-D convolution across
  the pooled channels, its kernel size chosen from the channel count; no reduction, a handful of weights.
- ``SelectiveKernel`` (Li et al. 2019): two 3x3 paths (the second dilated, a 5x5 receptive field), fused by
  a softmax attention over the paths; replaces a block's first 3x3 conv.

Module and parameter names follow timm (``fc1``/``fc2``, ``conv``, ``paths``/``attn``) so its weights load.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models.layers import NormLayer, make_divisible

Attention = Callable[[int], nn.Module]  # channels -> the attention module applied to the branch output


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean(x))))): reweight channels by a gate computed from the whole image."""

    def __init__(self, channels: int, ratio: float = 1 / 16) -> None:
        super().__init__()
        reduced = make_divisible(channels * ratio, 8, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class EfficientChannelAttention(nn.Module):
    """x * sigmoid(conv1d(mean(x))): each channel's gate from its k neighbours, k = odd(|log2(C) + 1| / 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        t = int(abs(math.log2(channels) + 1) / 2)
        kernel_size = max(t if t % 2 else t + 1, 3)
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.conv(x.mean((2, 3)).unsqueeze(1))  # (N, 1, C)
        return x * gate.sigmoid().view(x.shape[0], -1, 1, 1)


# ResNetConfig.attention -> (reduction ratio -> the factory, or None for no attention)
ATTENTION: dict[str, Callable[[float], Attention | None]] = {
    "none": lambda ratio: None,
    "se": lambda ratio: partial(SqueezeExcite, ratio=ratio),
    "eca": lambda ratio: EfficientChannelAttention,
}


def get_attention(kind: str, ratio: float) -> Attention | None:
    """The attention factory named by ``ResNetConfig.attention`` (``None`` for "none")."""
    if kind not in ATTENTION:
        raise ConfigError(f"unknown attention {kind!r}; choose one of {sorted(ATTENTION)}")
    return ATTENTION[kind](ratio)


class SelectiveKernel(nn.Module):
    """Two 3x3 conv-norm-ReLU paths with dilation 1 and 2, each on half of the input channels (timm's
    parameter-saving split), mixed per channel by softmax weights from a squeezed summary of both."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dilation: int, norm_layer: NormLayer) -> None:
        super().__init__()
        if in_channels % 2:
            raise ConfigError(f"a selective-kernel conv splits its input in two: {in_channels} channels is odd")
        self.split = in_channels // 2
        self.paths = nn.ModuleList(self._path(out_channels, stride, d, norm_layer) for d in (dilation, 2 * dilation))
        reduced = make_divisible(out_channels / 8, 16)
        self.attn = nn.Sequential(OrderedDict(
            fc_reduce=nn.Conv2d(out_channels, reduced, 1, bias=False),
            bn=norm_layer(reduced),
            act=nn.ReLU(inplace=True),
            fc_select=nn.Conv2d(reduced, out_channels * 2, 1, bias=False),
        ))  # fmt: skip

    def _path(self, out_channels: int, stride: int, dilation: int, norm_layer: NormLayer) -> nn.Sequential:
        """conv-norm-ReLU on half the input channels (a 3x3 dilated by 2 sees 5x5)."""
        conv = nn.Conv2d(self.split, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False)
        return nn.Sequential(OrderedDict(conv=conv, bn=norm_layer(out_channels), act=nn.ReLU(inplace=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.stack([path(part) for path, part in zip(self.paths, x.split(self.split, 1))], dim=1)
        logits = self.attn(paths.sum(1).mean((2, 3), keepdim=True))  # (N, 2C, 1, 1)
        weights = logits.view(x.shape[0], 2, -1, 1, 1).softmax(dim=1)
        return (paths * weights).sum(1)
