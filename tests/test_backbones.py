"""resnetlab ResNets inside torchvision's detectors and segmenters: build, one training step, inference."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import resnetlab
from resnetlab.backbones import dilated_backbone, freeze_layers, resnet_fpn_backbone
from resnetlab.errors import ConfigError
from resnetlab.models import convert_state_dict, load_weights
from resnetlab.models.layers import is_norm

NARROW = dict(widths=(8, 16, 32, 64), stem_channels=8)  # resnet18 layout, 8x narrower: fast on CPU
SIZE = 64


def _targets(masks: bool = False, keypoints: bool = False) -> list[dict[str, torch.Tensor]]:
    target = {"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([1])}
    if masks:
        mask = torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)
        mask[:, 10:50, 8:40] = 1
        target["masks"] = mask
    if keypoints:
        target["keypoints"] = torch.tensor([[[12.0, 14.0, 1.0], [30.0, 40.0, 1.0]]])
    return [target, {k: v.clone() for k, v in target.items()}]


def _train_step_and_infer(model: torch.nn.Module, targets: list[dict[str, torch.Tensor]]) -> list[dict]:
    torch.manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE) for _ in targets]
    losses = model.train()(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    assert any(p.grad is not None for p in model.backbone.parameters())
    with torch.no_grad():
        return model.eval()(images)


DETECTORS = {
    "faster_rcnn": (FasterRCNN, {}, {"boxes", "labels", "scores"}),
    "mask_rcnn": (MaskRCNN, {"masks": True}, {"boxes", "labels", "scores", "masks"}),
    "keypoint_rcnn": (KeypointRCNN, {"keypoints": True},
                      {"boxes", "labels", "scores", "keypoints", "keypoints_scores"}),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", DETECTORS)
def test_rcnn_detectors_train_and_infer_with_a_resnetlab_fpn(name: str) -> None:
    cls, target_kind, keys = DETECTORS[name]
    backbone = resnet_fpn_backbone("resnet18", trainable_layers=5, out_channels=32, **NARROW)
    extra = {"num_keypoints": 2} if name == "keypoint_rcnn" else {}
    model = cls(backbone, num_classes=2 if name == "keypoint_rcnn" else 3, min_size=SIZE, max_size=SIZE,
                rpn_batch_size_per_image=32, box_batch_size_per_image=16, **extra)  # fmt: skip
    detections = _train_step_and_infer(model, _targets(**target_kind))
    assert len(detections) == 2 and all(set(d) == keys for d in detections)


@pytest.mark.slow
def test_retinanet_on_p3_to_p7() -> None:
    backbone = resnet_fpn_backbone("resnet18", returned_layers=(2, 3, 4), out_channels=32,
                                   extra_blocks=LastLevelP6P7(32, 32), **NARROW)  # fmt: skip
    anchors = AnchorGenerator(tuple((s,) for s in (8, 16, 32, 64, 128)), ((0.5, 1.0, 2.0),) * 5)
    model = RetinaNet(backbone, num_classes=3, anchor_generator=anchors, min_size=SIZE, max_size=SIZE)
    detections = _train_step_and_infer(model, _targets())
    assert set(detections[0]) == {"boxes", "labels", "scores"}


@pytest.mark.parametrize(("head", "output_stride"), [("deeplabv3", 8), ("fcn", 16)])
def test_segmenters_with_a_dilated_backbone(head: str, output_stride: int) -> None:
    torch.manual_seed(0)
    backbone = dilated_backbone("resnet18", output_stride=output_stride, aux=True, **NARROW)
    x = torch.rand(2, 3, SIZE, SIZE)
    assert backbone(x)["out"].shape[-1] == SIZE // output_stride
    classes = 4
    aux_head = FCNHead(backbone.aux_channels, classes)
    if head == "deeplabv3":
        model = DeepLabV3(backbone, DeepLabHead(backbone.out_channels, classes), aux_head)
    else:
        model = FCN(backbone, FCNHead(backbone.out_channels, classes), aux_head)
    out = model.train()(x)
    target = torch.randint(0, classes, (2, SIZE, SIZE))
    loss = torch.nn.functional.cross_entropy(out["out"], target) + 0.5 * torch.nn.functional.cross_entropy(
        out["aux"], target
    )
    assert torch.isfinite(loss)
    loss.backward()
    assert model.eval()(x)["out"].shape == (2, classes, SIZE, SIZE)


def test_trainable_layers_freeze_the_early_stages() -> None:
    model = resnetlab.create_model("resnet18", **NARROW)
    freeze_layers(model, 2)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    freeze_layers(model, 5)
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("fc."))
    with pytest.raises(ConfigError):
        freeze_layers(model, 6)


def test_torchvision_detection_checkpoint_backbone_loads_into_resnetlab_resnet50() -> None:
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    detector = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    for m in detector.backbone.body.modules():  # random BN statistics, so the comparison means something
        if hasattr(m, "running_mean"):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = detector.state_dict()
    # Without weights torchvision builds this backbone with BatchNorm2d (FrozenBatchNorm2d when trained).
    norm = "frozen_batchnorm" if isinstance(detector.backbone.body.bn1, FrozenBatchNorm2d) else "batchnorm"
    ours = resnetlab.create_model("resnet50", norm_layer=norm, num_classes=0)
    load_weights(ours, convert_state_dict(state), origin="fasterrcnn_resnet50_fpn")
    fpn = resnet_fpn_backbone(ours, trainable_layers=3).eval()
    fpn.fpn.load_state_dict(detector.backbone.fpn.state_dict())
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        expected, got = detector.backbone(x), fpn(x)
    assert list(expected) == list(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


def test_fpn_backbone_norms_are_frozen_by_default_and_trainable_on_request() -> None:
    frozen = resnet_fpn_backbone("resnet18", trainable_layers=5, **NARROW)
    norms = [m for m in frozen.body.modules() if is_norm(m)]
    assert {type(m) for m in norms} == {FrozenBatchNorm2d}  # torchvision's detection default
    assert not any(list(m.parameters()) for m in norms)  # statistics and affine are buffers: nothing trains
    trained = resnet_fpn_backbone("resnet18", trainable_layers=5, norm_layer="batchnorm", **NARROW)
    assert {type(m) for m in trained.body.modules() if is_norm(m)} == {torch.nn.BatchNorm2d}


def test_fpn_over_a_dilated_resnet_keeps_the_last_stages_at_stride_16() -> None:
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone("resnet18", output_stride=16, out_channels=32, **NARROW).eval()
    with torch.no_grad():
        features = backbone(torch.rand(1, 3, SIZE, SIZE))
    sides = {name: f.shape[-1] for name, f in features.items()}
    # layer1..4 at strides 4, 8, 16, 16 (layer4 dilated instead of strided), then the max-pooled extra level
    assert sides == {"0": SIZE // 4, "1": SIZE // 8, "2": SIZE // 16, "3": SIZE // 16, "pool": SIZE // 32}
    assert all(f.shape[1] == 32 for f in features.values())
    dilations = {m.dilation for m in backbone.body.layer4.modules() if isinstance(m, torch.nn.Conv2d)}
    assert (2, 2) in dilations
