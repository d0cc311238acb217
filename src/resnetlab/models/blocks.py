"""Residual blocks: y = F(x) + shortcut(x).

Four classes, read top to bottom like the papers:

- ``BasicBlock``: two 3x3 convs (ResNet-18/34 and the CIFAR nets).
- ``Bottleneck``: 1x1 reduce, 3x3, 1x1 expand x4 (ResNet-50/101/152, ResNeXt, Wide ResNet-50/101).
- ``PreActBasicBlock`` / ``PreActBottleneck``: the same with BN-ReLU before each conv
  ("Identity Mappings in Deep Residual Networks", He et al. 2016), so the shortcut path stays a pure identity.

Module names match torchvision (``conv1``, ``bn1``, ..., ``downsample``) so its weights load unchanged.
The post-activation blocks carry the refinements of timm's ResNets as optional slots (timm's names): an
attention module ``se`` on the branch output (SE, ECA), an anti-aliasing filter ``aa`` that takes over
the stride of the strided 3x3, and a selective-kernel first conv (``BasicBlock``, with ``bn1`` inside it).
Every block can be *lesioned* (``block.lesioned = True``): the residual branch F is skipped and only the
shortcut remains, as in Veit et al. (2016). ``block.residual(x)`` computes F alone, and
``block.branch_output`` names the module whose output is F(x) before the addition, where the paper's
Figure 7 measures response strength.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models.attention import Attention, SelectiveKernel
from resnetlab.models.layers import AntiAlias, ConvLayer, NormLayer, conv1x1, conv3x3, drop_path, zero_


@dataclass(frozen=True)
class BlockSpec:
    """Everything about a block except its channels, stride and shortcut module."""

    norm_layer: NormLayer = nn.BatchNorm2d
    use_shortcut: bool = True  # False: the plain twin, y = F(x)
    groups: int = 1  # ResNeXt cardinality
    width_per_group: int = 64  # bottleneck width = planes * width_per_group / 64 * groups
    dilation: int = 1
    first_dilation: int | None = None  # the first block of a dilated stage keeps the previous dilation
    drop_path_rate: float = 0.0  # stochastic depth
    dropout: float = 0.0  # between the convs (Wide ResNet)
    stride_in_1x1: bool = False  # bottlenecks: "v1" stride placement
    conv_layer: ConvLayer = nn.Conv2d  # or weight-standardised (BiT)
    attention: Attention | None = None  # channels -> module gating the branch output (SE, ECA)
    anti_alias: AntiAlias | None = None  # (channels, stride) -> filter that does the 3x3's subsampling
    selective_kernel: bool = False  # BasicBlock: the first 3x3 becomes a selective-kernel conv

    def make_attention(self, channels: int) -> nn.Module:
        return self.attention(channels) if self.attention else nn.Identity()

    def make_anti_alias(self, channels: int, stride: int, first_dilation: int) -> tuple[int, nn.Module]:
        """(stride left to the conv, filter after it): as timm, the filter takes the stride where the
        block subsamples (or changes dilation); elsewhere it is absent."""
        if self.anti_alias is None or (stride == 1 and first_dilation == self.dilation):
            return stride, nn.Identity()
        return 1, self.anti_alias(channels, stride)

    def bottleneck_width(self, planes: int) -> int:
        return int(planes * (self.width_per_group / 64.0)) * self.groups


DEFAULT_SPEC = BlockSpec()


class ResidualBlock(nn.Module):
    """What every block shares: y = F(x) + shortcut(x), stochastic depth on F, and lesioning.

    Post-activation blocks apply ReLU after the sum; pre-activation blocks apply BN-ReLU (``bn1``) first.
    """

    expansion = 1
    preact = False

    def __init__(self, downsample: nn.Module | None, spec: BlockSpec) -> None:
        super().__init__()
        self.downsample = downsample
        self.use_shortcut = spec.use_shortcut
        self.drop_path = drop_path(spec.drop_path_rate)
        self.lesioned = False

    @property
    def last_layer(self) -> nn.Module:
        """The last conv or norm of F (before any attention)."""
        raise NotImplementedError

    @property
    def branch_output(self) -> nn.Module:
        se = getattr(self, "se", None)
        return se if se is not None and not isinstance(se, nn.Identity) else self.last_layer

    def zero_init_last(self) -> None:
        """Start as the identity: zero the last scale of F (Goyal et al. 2017)."""
        zero_(getattr(self.last_layer, "weight", None))

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual function F (for pre-activation blocks: of the already normalised input)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pre-activation blocks normalise once, and a projection shortcut sees that normalised input.
        branch_input = self.relu(self.bn1(x)) if self.preact else x
        out = x if self.downsample is None else self.downsample(branch_input)
        if not self.lesioned:
            residual = self.drop_path(self.residual(branch_input))
            out = residual.add_(out) if self.use_shortcut else residual  # in place, as torchvision
        if self.preact:
            return out
        # A lesioned identity block passes its input through: no in-place ReLU on a tensor autograd needs.
        return torch.relu(out) if out is x else self.relu(out)


class BasicBlock(ResidualBlock):
    """conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU."""

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        spec: BlockSpec = DEFAULT_SPEC,
    ) -> None:
        super().__init__(downsample, spec)
        if spec.groups != 1 or spec.width_per_group != 64:
            raise ConfigError("BasicBlock supports only groups=1 and width_per_group=64; use a bottleneck")
        first_dilation = spec.first_dilation or spec.dilation
        conv_stride, self.aa = spec.make_anti_alias(planes, stride, first_dilation)
        if spec.selective_kernel:  # conv-norm-ReLU paths inside: its output is already normalised
            self.conv1: nn.Module = SelectiveKernel(in_channels, planes, conv_stride, first_dilation, spec.norm_layer)
            self.bn1: nn.Module = nn.Identity()
        else:
            self.conv1 = conv3x3(in_channels, planes, conv_stride, dilation=first_dilation, conv=spec.conv_layer)
            self.bn1 = spec.norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(planes, planes, dilation=spec.dilation, conv=spec.conv_layer)
        self.bn2 = spec.norm_layer(planes)
        self.se = spec.make_attention(planes)

    @property
    def last_layer(self) -> nn.Module:
        return self.bn2

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.aa(self.relu(self.bn1(self.conv1(x))))
        return self.se(self.bn2(self.conv2(self.dropout(out))))


class Bottleneck(ResidualBlock):
    """1x1 reduce - 3x3 (grouped for ResNeXt) - 1x1 expand x4, + shortcut, ReLU.

    The stride sits in the 3x3 conv ("v1.5", torchvision) unless ``spec.stride_in_1x1`` (the original paper,
    Caffe and Keras: "v1").
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        spec: BlockSpec = DEFAULT_SPEC,
    ) -> None:
        super().__init__(downsample, spec)
        width = spec.bottleneck_width(planes)
        stride_1x1, stride_3x3 = (stride, 1) if spec.stride_in_1x1 else (1, stride)
        first_dilation = spec.first_dilation or spec.dilation
        stride_3x3, self.aa = spec.make_anti_alias(width, stride_3x3, first_dilation)
        conv = spec.conv_layer
        self.conv1 = conv1x1(in_channels, width, stride_1x1, conv=conv)
        self.bn1 = spec.norm_layer(width)
        self.conv2 = conv3x3(width, width, stride_3x3, spec.groups, first_dilation, conv=conv)
        self.bn2 = spec.norm_layer(width)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.conv3 = conv1x1(width, planes * self.expansion, conv=conv)
        self.bn3 = spec.norm_layer(planes * self.expansion)
        self.se = spec.make_attention(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)

    @property
    def last_layer(self) -> nn.Module:
        return self.bn3

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.aa(self.relu(self.bn2(self.conv2(out))))
        return self.se(self.bn3(self.conv3(self.dropout(out))))


class PreActBasicBlock(ResidualBlock):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, + shortcut (Wide ResNet adds dropout between the convs).

    A projection shortcut takes the pre-activated input, as in the identity-mappings paper and timm.
    """

    preact = True

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        spec: BlockSpec = DEFAULT_SPEC,
    ) -> None:
        super().__init__(downsample, spec)
        if spec.groups != 1 or spec.width_per_group != 64:
            raise ConfigError("PreActBasicBlock supports only groups=1 and width_per_group=64")
        self.bn1 = spec.norm_layer(in_channels)
        self.relu = nn.ReLU(inplace=True)
        conv = spec.conv_layer
        self.conv1 = conv3x3(in_channels, planes, stride, dilation=spec.first_dilation or spec.dilation, conv=conv)
        self.bn2 = spec.norm_layer(planes)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(planes, planes, dilation=spec.dilation, conv=conv)

    @property
    def last_layer(self) -> nn.Module:
        return self.conv2

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        return self.conv2(self.dropout(self.relu(self.bn2(out))))


class PreActBottleneck(ResidualBlock):
    """BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1 (x4), + shortcut. Stride in the 3x3, as in timm's ResNetV2."""

    expansion = 4
    preact = True

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        spec: BlockSpec = DEFAULT_SPEC,
    ) -> None:
        super().__init__(downsample, spec)
        width = spec.bottleneck_width(planes)
        stride_1x1, stride_3x3 = (stride, 1) if spec.stride_in_1x1 else (1, stride)
        self.bn1 = spec.norm_layer(in_channels)
        self.relu = nn.ReLU(inplace=True)
        conv = spec.conv_layer
        self.conv1 = conv1x1(in_channels, width, stride_1x1, conv=conv)
        self.bn2 = spec.norm_layer(width)
        self.conv2 = conv3x3(width, width, stride_3x3, spec.groups, spec.first_dilation or spec.dilation, conv=conv)
        self.bn3 = spec.norm_layer(width)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.conv3 = conv1x1(width, planes * self.expansion, conv=conv)

    @property
    def last_layer(self) -> nn.Module:
        return self.conv3

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.conv2(self.relu(self.bn2(out)))
        return self.conv3(self.dropout(self.relu(self.bn3(out))))


BLOCKS: dict[tuple[str, bool], type[ResidualBlock]] = {
    ("basic", False): BasicBlock,
    ("bottleneck", False): Bottleneck,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", True): PreActBottleneck,
}
