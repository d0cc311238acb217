"""Fold BatchNorm into the preceding convolution for inference: conv(x) * s + t becomes one conv.

A pair is folded where a conv's output goes straight into a norm (neighbours in a ``Sequential``, a
block's ``conv{i}`` -> ``bn{i}`` outside pre-activation blocks, a deep stem's last conv -> ``bn1``) and
only when the fold is exact:

- the norm is an affine map fixed at inference: a BatchNorm with running statistics (``BatchNorm2d``,
  ``SyncBatchNorm``, ``FrozenBatchNorm2d``). GroupNorm and a BatchNorm without running statistics normalise
  with statistics of the input itself, and are never folded;
- the conv applies a known weight: a conv that computes as ``nn.Conv2d`` does, or one that says which
  weight it applies through ``effective_weight()``. A weight-standardised ``StdConv2d`` (BiT) standardises
  its stored weight at every call, so BN's scale written into that weight would be standardised away: the
  fold replaces it by a plain ``nn.Conv2d`` holding the weight it applied, scaled. Any other conv (one
  that changes the convolution without saying what it applies) is left as it is, with its norm.

Pre-activation blocks put BN *before* the conv with a ReLU between, so there is nothing to fold there;
``fold_batchnorm`` reports how many pairs it folded.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils import skip_init
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops import FrozenBatchNorm2d

from resnetlab.models import ResNet


def applied_weight(conv: nn.Module) -> torch.Tensor | None:
    """The weight ``conv`` convolves with, or None where it is not one fixed weight (or not a conv)."""
    if not isinstance(conv, nn.Conv2d):
        return None
    kind = type(conv)
    if kind.forward is nn.Conv2d.forward and kind._conv_forward is nn.Conv2d._conv_forward:
        return conv.weight
    effective = getattr(conv, "effective_weight", None)
    return effective() if callable(effective) else None


def is_fixed_affine(norm: nn.Module) -> bool:
    """True for a norm that is a per-channel affine map at inference (statistics recorded, not measured)."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return (isinstance(norm, nn.BatchNorm2d | nn.SyncBatchNorm)
            and norm.running_mean is not None and norm.running_var is not None)  # fmt: skip


def _fuse(conv: nn.Conv2d, weight: torch.Tensor, norm: nn.Module) -> nn.Conv2d:
    """A plain conv computing ``norm(conv(x))`` (eval mode), from the weight ``conv`` applies."""
    fused = skip_init(nn.Conv2d, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                      device=weight.device, dtype=weight.dtype)  # fmt: skip
    fused.weight, fused.bias = fuse_conv_bn_weights(weight, conv.bias, norm.running_mean, norm.running_var,
                                                    norm.eps, norm.weight, norm.bias)  # fmt: skip
    return fused


def _neighbours(model: ResNet) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(conv parent, conv name, norm parent, norm name) for every module whose output goes straight into
    a norm-named or norm-typed module, by the layouts of resnetlab's stems, blocks and shortcuts."""
    pairs = []
    for parent in model.modules():
        if isinstance(parent, nn.Sequential):
            pairs += [(parent, a, parent, b) for (a, _), (b, _) in itertools.pairwise(parent.named_children())]
        if not getattr(parent, "preact", False):  # pre-activation blocks: bn{i} comes before conv{i}
            pairs += [(parent, f"conv{i}", parent, f"bn{i}") for i in (1, 2, 3) if hasattr(parent, f"bn{i}")]
    if isinstance(model.conv1, nn.Sequential) and hasattr(model, "bn1"):
        pairs.append((model.conv1, str(len(model.conv1) - 1), model, "bn1"))  # deep stem's last conv
    return pairs


@torch.no_grad()
def fold_batchnorm(model: ResNet) -> tuple[ResNet, int]:
    """A copy of ``model`` (eval mode) with BN folded into convs where that is exact, and the number of
    folded pairs."""
    folded = copy.deepcopy(model).eval()
    count = 0
    for conv_parent, conv_name, norm_parent, norm_name in _neighbours(folded):
        conv, norm = getattr(conv_parent, conv_name, None), getattr(norm_parent, norm_name)
        weight = applied_weight(conv) if conv is not None and is_fixed_affine(norm) else None
        if weight is None:
            continue
        setattr(conv_parent, conv_name, _fuse(conv, weight, norm))  # type: ignore[arg-type]
        setattr(norm_parent, norm_name, nn.Identity())
        count += 1
    return folded, count
