"""ResNets as backbones for torchvision's detection and segmentation models.

Our ResNet uses torchvision's module names (``conv1``, ``bn1``, ``layer1`` .. ``layer4``), so
torchvision's own wrappers apply unchanged: ``resnet_fpn_backbone`` returns a ``BackboneWithFPN`` for
Faster/Mask/Keypoint R-CNN and RetinaNet; ``dilated_backbone`` returns the ``IntermediateLayerGetter``
that DeepLabV3 and FCN heads expect (``"out"`` and optionally ``"aux"``), with output stride 8 or 16.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from resnetlab.errors import ConfigError
from resnetlab.models import ResNet, create_model

__all__ = ["build_resnet", "dilated_backbone", "freeze_layers", "resnet_fpn_backbone"]


def build_resnet(
    model: str | ResNet, pretrained: bool | str | os.PathLike | None = None, *, norm_layer: str = "frozen_batchnorm",
    **overrides: Any,
) -> ResNet:  # fmt: skip
    """A ResNet to use as a backbone: a name (built with ``create_model``) or an existing model.

    ``norm_layer="frozen_batchnorm"`` is torchvision's default for detection (batches of 2 images make
    BatchNorm statistics useless); pass ``"batchnorm"`` to train them.
    """
    if isinstance(model, ResNet):
        return model
    net = create_model(model, pretrained, norm_layer=norm_layer, num_classes=0, **overrides)
    assert isinstance(net, ResNet)
    return net


def freeze_layers(model: ResNet, trainable_layers: int) -> None:
    """Train only the last ``trainable_layers`` stages (5 also trains the stem), as torchvision does."""
    stages = len(model.stage_names)
    if not 0 <= trainable_layers <= stages + 1:
        raise ConfigError(f"trainable_layers must be in 0..{stages + 1}, got {trainable_layers}")
    trainable = model.stage_names[stages - trainable_layers :] if trainable_layers else []
    if trainable_layers == stages + 1:
        trainable = ["conv1", "bn1", *model.stage_names]
    for name, param in model.named_parameters():
        param.requires_grad_(any(name.startswith(f"{layer}.") for layer in trainable))


def resnet_fpn_backbone(
    model: str | ResNet = "resnet50",
    pretrained: bool | str | os.PathLike | None = None,
    *,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    trainable_layers: int = 3,
    out_channels: int = 256,
    extra_blocks: ExtraFPNBlock | None = None,
    **overrides: Any,
) -> BackboneWithFPN:
    """An FPN over the stages ``returned_layers`` of a resnetlab ResNet, for torchvision detectors.

    ``overrides`` are ``ResNetConfig`` fields (``norm_layer``, ``output_stride`` for dilation, ``widths``).
    RetinaNet wants ``returned_layers=(2, 3, 4)`` and ``extra_blocks=LastLevelP6P7(...)``.
    """
    net = build_resnet(model, pretrained, **overrides)
    freeze_layers(net, trainable_layers)
    bad = [i for i in returned_layers if not 1 <= i <= len(net.stage_names)]
    if bad:
        raise ConfigError(f"returned_layers {bad} out of range 1..{len(net.stage_names)}")
    return_layers = {f"layer{i}": str(n) for n, i in enumerate(returned_layers)}
    in_channels = [net.feature_info[i]["num_chs"] for i in returned_layers]
    return BackboneWithFPN(_body(net), return_layers, in_channels, out_channels,
                           extra_blocks=extra_blocks or LastLevelMaxPool())  # fmt: skip


def dilated_backbone(
    model: str | ResNet = "resnet50",
    pretrained: bool | str | os.PathLike | None = None,
    *,
    output_stride: int = 8,
    aux: bool = False,
    norm_layer: str = "batchnorm",
    **overrides: Any,
) -> IntermediateLayerGetter:
    """A dilated ResNet (``output_stride`` 8 or 16) returning ``{"out": last stage, "aux": the one before}``,
    the backbone of ``torchvision.models.segmentation.DeepLabV3`` / ``FCN``. Its channels: ``.out_channels``
    and ``.aux_channels``."""
    if isinstance(model, ResNet):
        if model.config.output_stride != output_stride:
            raise ConfigError(f"this model has output_stride={model.config.output_stride}; build it with "
                              f"output_stride={output_stride}")  # fmt: skip
        net = model
    else:
        net = build_resnet(model, pretrained, norm_layer=norm_layer, output_stride=output_stride, **overrides)
    last = net.stage_names[-1]
    layers = {last: "out", **({net.stage_names[-2]: "aux"} if aux else {})}
    backbone = IntermediateLayerGetter(_body(net), return_layers=layers)
    backbone.out_channels = net.feature_info[-1]["num_chs"]
    backbone.aux_channels = net.feature_info[-2]["num_chs"]
    return backbone


def _body(model: ResNet) -> nn.Module:
    """The model itself: ``IntermediateLayerGetter`` runs its children in order (``conv1`` .. the last
    returned stage), which is our forward pass for post-activation nets only."""
    if model.config.preact:
        raise ConfigError("pre-activation ResNets have no stem norm and end stages un-normalised; use a "
                          "post-activation ResNet as a backbone")  # fmt: skip
    return model
