"""Small building pieces shared by stems, blocks and shortcuts."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
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


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)


def drop_path(rate: float) -> nn.Module:
    """Stochastic depth on the residual branch (torchvision's per-sample implementation)."""
    return StochasticDepth(rate, "row") if rate > 0 else nn.Identity()


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | FrozenBatchNorm2d)


def zero_(param: torch.Tensor | None) -> None:
    if param is not None:
        nn.init.zeros_(param)
