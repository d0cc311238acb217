"""Our ResNets drop into torchvision's detection stack (the README says so; this keeps it true)."""

from __future__ import annotations

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN

import resnetlab


def test_faster_rcnn_with_a_resnetlab_fpn_backbone_trains_a_step() -> None:
    torch.manual_seed(0)
    model = resnetlab.create_model("resnet18", norm_layer="frozen_batchnorm")
    backbone = BackboneWithFPN(model, return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
                               in_channels_list=[64, 128, 256, 512], out_channels=64)  # fmt: skip
    detector = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128).train()
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}
    losses = detector([torch.rand(3, 128, 128)], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    detector.eval()
    [detections] = detector([torch.rand(3, 128, 128)])
    assert set(detections) == {"boxes", "labels", "scores"}
