"""Published weights of the refined ResNets: tags, their preprocessing, offline hub files, torchvision names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import resnetlab
from resnetlab.cli.main import main
from resnetlab.errors import WeightsError
from resnetlab.models import MODELS
from resnetlab.models.registry import TIMM_HUB_WEIGHTS, TIMM_RESNETS

TAGS = [(name, tag) for name, tags in TIMM_HUB_WEIGHTS.items() for tag in tags]


def test_every_refined_resnet_with_timm_weights_offers_all_of_timms_tags() -> None:
    timm = pytest.importorskip("timm")
    for name in TIMM_RESNETS:
        published = {t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")}
        assert set(MODELS[name].weights) == published, name
    assert len(MODELS["seresnet50"].weights) == 4  # a1, a2, a3 (ResNet strikes back) and ra2


@pytest.mark.parametrize(("name", "tag"), TAGS)
def test_a_tags_preprocessing_is_timms(name: str, tag: str) -> None:
    """The input size, resize interpolation, crop, mean/std and classes each weight file was trained with."""
    timm = pytest.importorskip("timm")
    expected = timm.models.get_pretrained_cfg(f"{name}.{tag}").to_dict()
    source = MODELS[name].weights[tag]
    assert source.ref == f"timm/{name}.{tag}" == expected["hf_hub_id"]
    config = resnetlab.models.get_config(name, **source.config)
    for key in ("input_size", "interpolation", "crop_pct", "mean", "std", "num_classes"):
        assert getattr(config, key) == pytest.approx(expected[key]), (key, getattr(config, key), expected[key])
    assert (source.labels == "imagenet-1k") == (expected["num_classes"] == 1000)


@pytest.mark.parametrize(
    ("name", "tag"),
    [("seresnet50", "a1_in1k"), ("skresnet18", "ra_in1k"), ("resnetv2_50x1_bit", "goog_in21k_ft_in1k")],
)
def test_timm_hub_files_load_offline_from_a_local_weights_folder(
    name: str, tag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub file saved as the weights folder names it (``timm--NAME.TAG.safetensors``) loads by its tag,
    converted (selective kernel, ResNetV2 layouts) and with its preprocessing, and computes timm's logits."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    save_file(reference.state_dict(), tmp_path / f"timm--{name}.{tag}.safetensors")
    monkeypatch.setenv("RESNETLAB_WEIGHTS_PATH", str(tmp_path))
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.hf_hub_download", _no_download)
    ours = resnetlab.create_model(name, pretrained=tag).eval()
    cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}")
    assert ours.config.input_size == cfg.input_size and ours.config.interpolation == cfg.interpolation
    assert ours.config.label_names is not None and len(ours.config.label_names) == 1000
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


def _no_download(*args: object, **kwargs: object) -> None:
    raise OSError("offline")


def test_create_model_accepts_torchvision_weight_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``pretrained="ResNet18_Weights.IMAGENET1K_V1"`` as ``finetune --from`` takes it (torchvision's file
    found offline in a weights folder under torchvision's own name), with the class names; a name of
    another architecture or an unknown member fails in one line naming the valid ones."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.save(reference.state_dict(), tmp_path / Path(weights.url).name)
    monkeypatch.setenv("RESNETLAB_WEIGHTS_PATH", str(tmp_path))
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))
    ours = resnetlab.create_model("resnet18", pretrained="ResNet18_Weights.IMAGENET1K_V1").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))
    assert list(ours.config.label_names) == weights.meta["categories"]
    with pytest.raises(WeightsError, match="weights for resnet18, not resnet34"):
        resnetlab.create_model("resnet34", pretrained="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(WeightsError, match=r"ResNet18_Weights\.IMAGENET1K_V1"):
        resnetlab.create_model("resnet18", pretrained="ResNet18_Weights.BOGUS")


def test_list_models_pretrained_and_the_cli(capsys: pytest.CaptureFixture) -> None:
    with_weights = resnetlab.list_models(pretrained=True)
    assert {"resnet50", "resnet56", "seresnet50", "resnetv2_50x1_bit", "resnet50_gn"} <= set(with_weights)
    assert "resnet50t" not in with_weights and "plain56" not in with_weights  # timm has no resnet50t weights
    assert set(with_weights) == {n for n in resnetlab.list_models() if MODELS[n].weights}
    assert resnetlab.list_models("seresnet*", pretrained=True) == ["seresnet50"]
    assert main(["models", "--pretrained", "seresnet*"]) == 0
    out = capsys.readouterr().out
    assert "seresnet50" in out and "a1_in1k,a2_in1k,a3_in1k,ra2_in1k" in out and "seplain50" not in out
    assert "gmacs" in out.splitlines()[0]
    assert main(["models", "--pretrained", "plain*"]) == 0
    assert "no model with published weights matches 'plain*'" in capsys.readouterr().out
