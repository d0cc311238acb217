"""Given identical weights, our models compute what torchvision, timm and Hugging Face compute."""

from __future__ import annotations

import pytest
import torch
import torchvision

import resnetlab
from resnetlab.models import MODELS
from resnetlab.models.registry import TIMM_RESNETS, TORCHVISION_PARAMS
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
    [
        ("resnet50d", "resnet50d"),
        ("resnet18d", "resnet18d"),
        ("resnet50c", "resnet50c"),
        ("resnetv2_50", "preact_resnet50"),
        ("resnetv2_18", "preact_resnet18"),
    ],
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
    ("layer_type", "hidden", "depths", "our_name", "overrides"),
    [
        ("bottleneck", [256, 512, 1024, 2048], [3, 4, 6, 3], "resnet50", {}),
        ("basic", [64, 128, 256, 512], [2, 2, 2, 2], "resnet18", {}),
        # downsample_in_bottleneck: the stride in the first 1x1, as in the original paper ("v1")
        ("bottleneck", [256, 512, 1024, 2048], [3, 4, 6, 3], "resnet50", {"stride_in_1x1": True}),
    ],
)
def test_huggingface_parity(layer_type, hidden, depths, our_name, overrides) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=64, hidden_sizes=hidden, depths=depths, layer_type=layer_type, num_labels=1000,
        downsample_in_bottleneck=overrides.get("stride_in_1x1", False),
    )  # fmt: skip
    reference = transformers.ResNetForImageClassification(config)
    _randomise_norm_stats(reference)
    ours = resnetlab.create_model(our_name, **overrides)
    load_weights(ours, convert_state_dict(reference.state_dict()))  # format detected from the keys
    assert resnetlab.models.count_params(ours) == sum(p.numel() for p in reference.parameters())
    x = torch.randn(2, 3, 64, 64)
    assert _max_diff(ours, reference, x, train=False) <= 1e-5
    assert _max_diff(ours, reference, x, train=True) <= 1e-5
    if overrides:  # the stride placement matters: v1.5 given v1's weights computes something else
        other = resnetlab.create_model(our_name)
        load_weights(other, convert_state_dict(reference.state_dict()))
        assert _max_diff(other, reference, x, train=False) > 1e-2


@pytest.mark.parametrize("name", [n for n, e in MODELS.items() if e.timm_name])
def test_params_match_timm(name: str) -> None:
    """Every named model that timm also has counts exactly timm's parameters (built on the meta device)."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        reference = timm.create_model(MODELS[name].timm_name)
    assert resnetlab.model_info(name)["params"] == sum(p.numel() for p in reference.parameters())


def test_reference_weight_files_load_by_path(tmp_path) -> None:
    """``create_model(name, pretrained=FILE)`` reads the files other libraries write (a torchvision .pth, a timm
    ResNetV2 .safetensors, a Hugging Face pytorch_model.bin) and then computes what those libraries compute."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    hf_config = transformers.ResNetConfig(
        hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic", num_labels=1000
    )
    cases = [
        ("resnet18", "resnet18-tv.pth", torchvision.models.resnet18(), torch.save),
        ("preact_resnet18", "resnetv2_18.safetensors", timm.create_model("resnetv2_18"), save_file),
        ("resnet18", "pytorch_model.bin", transformers.ResNetForImageClassification(hf_config), torch.save),
    ]
    x = torch.randn(2, 3, 64, 64)
    for name, filename, reference, save in cases:
        _randomise_norm_stats(reference)
        save(reference.state_dict(), tmp_path / filename)
        ours = resnetlab.create_model(name, pretrained=tmp_path / filename)
        assert _max_diff(ours, reference, x, train=False) <= 1e-5, filename


def _randomise_norms(model: torch.nn.Module) -> None:
    """``_randomise_norm_stats`` for BatchNorm, and random affine parameters for GroupNorm too."""
    _randomise_norm_stats(model)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.data.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_channels, generator=g) * 0.1)


@pytest.mark.parametrize("name", list(TIMM_RESNETS))  # each about 1 s at 64x64
def test_refined_resnets_equal_timm(name: str) -> None:
    """SE, ECA, selective kernel, ResNet-RS, BiT, anti-aliased, T/S stems, GroupNorm: timm's state dict loads
    with strict=True (converted where our keys differ), and logits agree within 1e-5 in eval and train mode."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False)
    _randomise_norms(reference)
    ours = resnetlab.create_model(name)
    ours.load_state_dict(convert_state_dict(reference.state_dict()), strict=True)  # layout detected from keys
    assert resnetlab.models.count_params(ours) == sum(p.numel() for p in reference.parameters())
    x = torch.randn(2, 3, 64, 64)
    assert _max_diff(ours, reference, x, train=False) <= 1e-5
    assert _max_diff(ours, reference, x, train=True) <= 1e-5


# The refinements are options, not models: they compose with any net of the table into timm's other variants.
COMPOSED = [
    ("seresnet18", "resnet18", dict(attention="se")),  # SE in a basic block
    ("resnetblur18", "resnet18", dict(anti_alias="blur")),  # blur-pool in a basic block
    ("resnetaa34d", "resnet34d", dict(anti_alias="avg")),
    ("skresnet34", "resnet34", dict(selective_kernel=True)),
    ("seresnet101", "resnet101", dict(attention="se")),
    ("ecaresnet101d", "resnet101d", dict(attention="eca")),
    ("resnetrs101", "resnet101d", dict(stem_pool="conv", attention="se", attention_ratio=0.25)),
    ("resnetblur101d", "resnet101d", dict(anti_alias="blur")),
    ("ecaresnet26t", "resnet50", dict(layers=(2, 2, 2, 2), stem="deep_tiered", avg_down=True, attention="eca")),
]


@pytest.mark.parametrize(("timm_name", "our_name", "options"), COMPOSED)
def test_options_compose_into_timms_other_variants(timm_name: str, our_name: str, options: dict) -> None:
    """Same parameter count (meta device); the small basic-block ones also compute timm's logits."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        reference = timm.create_model(timm_name)
    assert resnetlab.model_info(our_name, **options)["params"] == sum(p.numel() for p in reference.parameters())
    if our_name not in ("resnet18", "resnet34"):
        return
    torch.manual_seed(0)
    reference = timm.create_model(timm_name)
    _randomise_norms(reference)
    ours = resnetlab.create_model(our_name, **options)
    ours.load_state_dict(convert_state_dict(reference.state_dict()), strict=True)
    x = torch.randn(2, 3, 64, 64)
    assert _max_diff(ours, reference, x, train=False) <= 1e-5
    assert _max_diff(ours, reference, x, train=True) <= 1e-5
