"""Given identical weights, our models compute what torchvision, timm and Hugging Face compute."""

from __future__ import annotations

import pytest
import torch
import torchvision

import resnetlab
from resnetlab.models.registry import TORCHVISION_PARAMS
from resnetlab.models.weights import convert_state_dict, load_weights

TORCHVISION_NAMES = list(TORCHVISION_PARAMS)


def _max_diff(ours: torch.nn.Module, reference: torch.nn.Module, x: torch.Tensor, train: bool) -> float:
    """Largest absolute output difference, relative to the output scale when that exceeds 1."""
    ours.train(train)
    reference.train(train)
    with torch.no_grad():
        a, b = ours(x), reference(x)
    b = getattr(b, "logits", b)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


def _randomise_norm_stats(model: torch.nn.Module) -> None:
    """Give BN layers non-trivial statistics and affine parameters so eval mode is really tested."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_parity(name: str) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.get_model(name)
    _randomise_norm_stats(reference)
    ours = resnetlab.create_model(name)
    ours.load_state_dict(reference.state_dict(), strict=True)  # identical keys and shapes
    assert resnetlab.models.count_params(ours) == TORCHVISION_PARAMS[name]
    x = torch.randn(2, 3, 64, 64)
    assert _max_diff(ours, reference, x, train=False) <= 1e-5
    assert _max_diff(ours, reference, x, train=True) <= 1e-5


@pytest.mark.parametrize(
    ("timm_name", "our_name"),
    [("resnet50d", "resnet50d"), ("resnet18d", "resnet18d"), ("resnetv2_50", "preact_resnet50")],
)
def test_timm_parity(timm_name: str, our_name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model(timm_name)
    _randomise_norm_stats(reference)
    ours = resnetlab.create_model(our_name)
    load_weights(ours, convert_state_dict(reference.state_dict()))
    assert resnetlab.models.count_params(ours) == sum(p.numel() for p in reference.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the trunk is bit-identical; timm's 1x1-conv head sums in another order
        assert torch.allclose(ours.eval().forward_features(x), reference.eval().forward_features(x), atol=1e-5)
    assert _max_diff(ours, reference, x, train=False) <= 1e-5
    assert _max_diff(ours, reference, x, train=True) <= 1e-5


@pytest.mark.parametrize(
    ("layer_type", "hidden", "depths", "our_name"),
    [
        ("bottleneck", [256, 512, 1024, 2048], [3, 4, 6, 3], "resnet50"),
        ("basic", [64, 128, 256, 512], [2, 2, 2, 2], "resnet18"),
    ],
)
def test_huggingface_parity(layer_type: str, hidden: list[int], depths: list[int], our_name: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=64, hidden_sizes=hidden, depths=depths, layer_type=layer_type, num_labels=1000
    )
    reference = transformers.ResNetForImageClassification(config)
    _randomise_norm_stats(reference)
    ours = resnetlab.create_model(our_name)
    load_weights(ours, convert_state_dict(reference.state_dict()))  # format detected from the keys
    x = torch.randn(2, 3, 64, 64)
    assert _max_diff(ours, reference, x, train=False) <= 1e-5


def test_dilated_bottleneck_matches_torchvision() -> None:
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    ours = resnetlab.create_model("resnet50", output_stride=8)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert _max_diff(ours, reference, x, train=False) <= 1e-5
    assert ours.forward_features(x).shape[-1] == 8  # 64 / 8
