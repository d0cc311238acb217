"""Fold BatchNorm into the preceding convolution for inference: conv(x) * s + t becomes one conv.

Applies to every conv followed directly by a norm with running statistics (post-activation blocks,
projection shortcuts, all stems). Pre-activation blocks put BN *before* the conv with a ReLU between, so
there is nothing to fold there; ``fold_batchnorm`` reports how many pairs it folded.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

from resnetlab.models import ResNet

_FOLDABLE = (nn.BatchNorm2d, FrozenBatchNorm2d)


def _fuse(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d:
    fused = copy.deepcopy(conv)
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                        norm.eps, norm.weight, norm.bias)  # fmt: skip
    fused.weight, fused.bias = weight, bias
    return fused


def _pairs(model: ResNet) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(conv parent, conv name, norm parent, norm name) for every conv directly followed by a norm."""
    pairs = []
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            children = list(parent.named_children())
            for (a, conv), (b, norm) in itertools.pairwise(children):
                if isinstance(conv, nn.Conv2d) and isinstance(norm, _FOLDABLE):
                    pairs.append((parent, a, parent, b))
        for i in (1, 2, 3):
            conv, norm = getattr(parent, f"conv{i}", None), getattr(parent, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, _FOLDABLE) and not getattr(parent, "preact", False):
                pairs.append((parent, f"conv{i}", parent, f"bn{i}"))
    if isinstance(model.conv1, nn.Sequential) and isinstance(getattr(model, "bn1", None), _FOLDABLE):
        pairs.append((model.conv1, str(len(model.conv1) - 1), model, "bn1"))  # deep stem's last conv
    return pairs


@torch.no_grad()
def fold_batchnorm(model: ResNet) -> tuple[ResNet, int]:
    """A copy of ``model`` (eval mode) with BN folded into convs, and the number of folded pairs."""
    folded = copy.deepcopy(model).eval()
    pairs = _pairs(folded)
    for conv_parent, conv_name, norm_parent, norm_name in pairs:
        setattr(conv_parent, conv_name, _fuse(getattr(conv_parent, conv_name), getattr(norm_parent, norm_name)))
        setattr(norm_parent, norm_name, nn.Identity())
    return folded, len(pairs)
