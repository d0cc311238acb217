"""Small building pieces shared by stems, blocks and shortcuts."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, StochasticDepth

from resnetlab.errors import ConfigError

NormLayer = Callable[[int], nn.Module]


def _group_norm(num_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    # Fall back to fewer groups for narrow layers (CIFAR nets start at 16 channels).
    groups = min(num_groups, num_channels)
    while num_channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, num_channels)


def _no_norm(num_channels: int) -> nn.Identity:
    """No normalisation at all: the pre-BatchNorm setting where plain nets' gradients vanish."""
    return nn.Identity()


NORM_LAYERS: dict[str, NormLayer] = {
    "batchnorm": nn.BatchNorm2d,
    "none": _no_norm,
    "syncbatchnorm": nn.SyncBatchNorm,
    "frozen_batchnorm": FrozenBatchNorm2d,
    "groupnorm": _group_norm,
}


def get_norm_layer(norm: str | NormLayer) -> NormLayer:
    """Resolve a norm-layer name (see ``NORM_LAYERS``) or pass a callable ``f(channels) -> Module`` through."""
    if callable(norm):
        return norm
    if norm.startswith("groupnorm"):  # "groupnorm" or "groupnorm16"
        groups = norm.removeprefix("groupnorm")
        return partial(_group_norm, num_groups=int(groups)) if groups else _group_norm
    try:
        return NORM_LAYERS[norm]
    except KeyError:
        raise ConfigError(f"unknown norm_layer {norm!r}; choose one of {sorted(NORM_LAYERS)}") from None


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al. 2019): each filter is normalised to zero mean and
    unit variance before use. BiT pairs it with GroupNorm so that no layer depends on the batch.

    Computed as timm computes it (a batch-norm over each filter, eps 1e-8 as in BiT), so its weights load.
    """

    def __init__(self, *args: object, eps: float = 1e-8, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eps = eps

    def effective_weight(self) -> torch.Tensor:
        """The standardised weight the convolution applies (what BN folding must start from)."""
        return F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


ConvLayer = type[nn.Conv2d]
CONV_LAYERS: dict[str, ConvLayer] = {"conv": nn.Conv2d, "std_conv": StdConv2d}


def conv3x3(
    in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, dilation: int = 1, conv: ConvLayer = nn.Conv2d
) -> nn.Conv2d:
    return conv(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1, conv: ConvLayer = nn.Conv2d) -> nn.Conv2d:
    return conv(in_ch, out_ch, 1, stride, bias=False)


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """``value`` rounded to a multiple of ``divisor`` (never below ``divisor``, nor below ``round_limit`` of
    ``value``): how timm (and so the published weights) sizes the reduced channels of attention layers."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


class BlurPool2d(nn.Module):
    """Blur, then subsample (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again"): a fixed
    3x3 binomial filter [1, 2, 1]^2 / 16 per channel, reflect-padded, applied with the stride. No parameters."""

    def __init__(self, channels: int, stride: int = 2) -> None:
        super().__init__()
        self.channels, self.stride = channels, stride
        taps = torch.tensor([1.0, 2.0, 1.0]) / 4
        self.register_buffer(
            "filt", (taps[:, None] * taps[None, :]).expand(channels, 1, 3, 3).clone(), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.filt, stride=self.stride, groups=self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}"


AntiAlias = Callable[[int, int], nn.Module]  # (channels, stride) -> the downsampling module
ANTI_ALIAS: dict[str, AntiAlias | None] = {
    "none": None,
    "avg": lambda channels, stride: nn.AvgPool2d(stride),  # timm's resnetaa*: a 2x2 box filter
    "blur": BlurPool2d,  # timm's resnetblur*: the 3x3 binomial filter
}


def drop_path(rate: float) -> nn.Module:
    """Stochastic depth on the residual branch (torchvision's per-sample implementation)."""
    return StochasticDepth(rate, "row") if rate > 0 else nn.Identity()


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | FrozenBatchNorm2d)


def zero_(param: torch.Tensor | None) -> None:
    if param is not None:
        nn.init.zeros_(param)
