"""Fine-tuning: strategies freeze what they say, BN modes keep statistics, sources load, the CLI works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import resnetlab
from colour_folders import write_colour_folder
from resnetlab.cli.main import main
from resnetlab.errors import ConfigError, WeightsError
from resnetlab.models.weights import adapt_input_conv
from resnetlab.train import load_recipe
from resnetlab.transfer import FinetuneStrategy, apply_strategy, finetune, load_pretrained_source, parameter_groups

TINY = dict(widths=(4, 8, 16), stem_channels=4)  # a resnet20 layout, 4x narrower


def _tiny(**overrides: object) -> resnetlab.ResNet:
    torch.manual_seed(0)
    return resnetlab.create_model("resnet20", **{**TINY, **overrides})


def _trainable(model: resnetlab.ResNet) -> set[str]:
    return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 'pretrained' tiny ResNet-20 (10 classes, 3 channels)."""
    path = tmp_path_factory.mktemp("pretrained")
    resnetlab.save_pretrained(_tiny(num_classes=10), path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of 16 px images: reddish vs bluish squares (learnable in a few steps)."""
    return write_colour_folder(tmp_path_factory.mktemp("colours"), {"train": 24, "val": 8}, noise=120, boost=120)


def test_linear_probe_trains_only_the_head() -> None:
    model = _tiny()
    assert apply_strategy(model.train(), FinetuneStrategy(mode="linear")) == ["head"]
    assert _trainable(model) == {"fc"}
    assert not model.layer1[0].bn1.training  # frozen parts keep their BN statistics


def test_partial_freezes_the_stem_and_first_stages() -> None:
    model = _tiny()
    apply_strategy(model.train(), FinetuneStrategy(mode="partial", freeze_stages=2))
    assert _trainable(model) == {"layer3", "fc"}
    with pytest.raises(ConfigError, match="3 stages"):
        apply_strategy(model, FinetuneStrategy(mode="partial", freeze_stages=4))


@pytest.mark.parametrize(("bn", "affine_trains", "bn_training"), [("train", True, True), ("eval", True, False),
                                                                   ("frozen", False, False)])  # fmt: skip
def test_bn_modes(bn: str, affine_trains: bool, bn_training: bool) -> None:
    model = _tiny()
    apply_strategy(model.train(), FinetuneStrategy(bn=bn))
    norm = model.layer2[0].bn1
    assert norm.weight.requires_grad is affine_trains and norm.training is bn_training
    assert model.layer2[0].conv1.weight.requires_grad


def test_gradual_unfreezing_goes_down_one_part_per_step() -> None:
    model, strategy = _tiny(), FinetuneStrategy(unfreeze_every=2)
    seen = [apply_strategy(model, strategy, epoch) for epoch in range(0, 10, 2)]
    assert seen == [["head"], ["layer3", "head"], ["layer2", "layer3", "head"],
                    ["layer1", "layer2", "layer3", "head"], ["stem", "layer1", "layer2", "layer3", "head"]]  # fmt: skip
    partial = FinetuneStrategy(mode="partial", freeze_stages=2, unfreeze_every=1)
    assert apply_strategy(model, partial, epoch=10) == ["layer3", "head"]  # never below what the mode allows


def test_discriminative_learning_rates_decay_towards_the_stem() -> None:
    groups = parameter_groups(_tiny(), lr=0.1, weight_decay=1e-4, lr_decay=0.5)
    assert [g["name"] for g in groups] == ["stem", "layer1", "layer2", "layer3", "head"]
    assert [g["lr"] for g in groups] == pytest.approx([0.1 / 16, 0.1 / 8, 0.1 / 4, 0.1 / 2, 0.1])
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in _tiny().parameters())


def test_strategy_rejects_nonsense() -> None:
    for bad in (dict(mode="half"), dict(bn="sync"), dict(lr_decay=0), dict(mode="partial")):
        with pytest.raises(ConfigError):
            FinetuneStrategy(**bad)


def test_sources_load_and_adapt_the_input_conv(source_dir: Path, tmp_path: Path) -> None:
    original = resnetlab.from_pretrained(source_dir)
    grey = load_pretrained_source(source_dir, in_chans=1)
    torch.testing.assert_close(grey.conv1.weight, adapt_input_conv(original.conv1.weight, 1))
    multispectral = load_pretrained_source(source_dir, in_chans=5)
    assert multispectral.conv1.weight.shape[1] == 5
    torch.save(original.state_dict(), tmp_path / "plain.pth")  # a bare state dict needs the architecture
    with pytest.raises(WeightsError, match="--model"):
        load_pretrained_source(tmp_path / "plain.pth")
    with pytest.raises(WeightsError):
        load_pretrained_source(tmp_path / "missing")


@pytest.mark.slow
def test_linear_probe_leaves_the_backbone_untouched(source_dir: Path, folder: Path, tmp_path: Path) -> None:
    cfg = load_recipe("finetune", data=str(folder), pretrained=str(source_dir), image_size=16, batch_size=8,
                      max_iters=6, lr=0.05, warmup_iters=0, run_dir=str(tmp_path / "run"), progress=False)  # fmt: skip
    result = finetune(cfg, FinetuneStrategy(mode="linear", bn="eval"))
    before, after = resnetlab.from_pretrained(source_dir).state_dict(), result.model.state_dict()
    for key, value in before.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(after[key].cpu(), value, msg=key)  # weights and BN statistics
    saved = resnetlab.from_pretrained(result.model_dir)
    assert saved.config.label_names == ("blue", "red") and saved.config.num_classes == 2
    assert (result.run_dir / "history.json").is_file()


@pytest.mark.slow
def test_grey_data_finetunes_a_three_channel_source(source_dir: Path, tmp_path: Path) -> None:
    cfg = load_recipe("finetune", data="digits", pretrained=str(source_dir), image_size=16, batch_size=16,
                      max_iters=3, warmup_iters=0, run_dir=str(tmp_path / "run"), progress=False)  # fmt: skip
    result = finetune(cfg, FinetuneStrategy(mode="partial", freeze_stages=1, lr_decay=0.5))
    assert result.model.config.in_chans == 1 and result.model.config.num_classes == 10
    assert np.isfinite(result.history[-1]["train_loss"])


@pytest.mark.slow
def test_cli_finetune_json(source_dir: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["finetune", "--from", str(source_dir), "--data", str(folder), "--mode", "full", "--bn", "frozen",
                 "--unfreeze-every", "1", "--epochs", "2", "--batch-size", "8", "--image-size", "16",
                 "--run-dir", str(tmp_path / "cli"), "--json"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [h["trainable"] for h in out["history"]] == [["head"], ["layer3", "head"]]
    assert Path(out["model_dir"], "model.safetensors").is_file()


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random BN statistics too, so that a wrongly mapped norm layer changes the outputs."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _torchvision_file(folder: Path) -> tuple[torch.nn.Module, Path]:
    import torchvision

    reference = _randomised(torchvision.models.resnet18())
    torch.save(reference.state_dict(), folder / "resnet18-tv.pth")
    return reference, folder / "resnet18-tv.pth"


def _timm_file(folder: Path) -> tuple[torch.nn.Module, Path]:
    import timm
    from safetensors.torch import save_file

    reference = _randomised(timm.create_model("resnet18", pretrained=False))
    save_file(reference.state_dict(), folder / "resnet18-timm.safetensors")  # the layout timm's hub files have
    return reference, folder / "resnet18-timm.safetensors"


def _hf_file(folder: Path) -> tuple[torch.nn.Module, Path]:
    import transformers

    # the layout of microsoft/resnet-18
    config = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                       layer_type="basic", num_labels=1000)  # fmt: skip
    reference = _randomised(transformers.ResNetForImageClassification(config))
    reference.save_pretrained(folder / "hf")  # writes hf/model.safetensors
    return reference, folder / "hf" / "model.safetensors"


@pytest.mark.parametrize("make", [_torchvision_file, _timm_file, _hf_file], ids=["torchvision", "timm", "hf"])
def test_weight_files_of_other_libraries_load_with_model(make, tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference, path = make(tmp_path)
    with pytest.raises(WeightsError, match="--model"):  # a bare weights file does not say its architecture
        load_pretrained_source(path)
    ours = load_pretrained_source(path, "resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
        expected = getattr(expected, "logits", expected)
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_cli_finetunes_from_a_weights_file_with_model(folder: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    _, path = _torchvision_file(tmp_path)
    args = ["finetune", "--from", str(path), "--data", str(folder), "--max-iters", "1", "--batch-size", "8",
            "--image-size", "32", "--run-dir", str(tmp_path / "run"), "--json"]  # fmt: skip
    assert main([*args, "--model", "resnet34"]) == 1  # the wrong architecture: a clear error, not a traceback
    assert "does not match resnet34" in json.loads(capsys.readouterr().out)["message"]
    assert main([*args, "--model", "resnet18"]) == 0
    out = json.loads(capsys.readouterr().out)
    saved = resnetlab.from_pretrained(out["model_dir"])
    assert saved.name == "resnet18" and saved.config.label_names == ("blue", "red")


def test_a_training_checkpoint_keeps_its_preprocessing_and_labels(tmp_path: Path) -> None:
    from resnetlab.train.checkpoint import save_checkpoint

    net = _tiny(num_classes=3, mean=(0.3, 0.3, 0.3), label_names=("a", "b", "c"))
    state = {"model": net.state_dict(), "model_config": net.config.to_dict(), "architecture": net.name}
    save_checkpoint(tmp_path / "last.pt", state)  # the engine's checkpoint layout
    for model in (None, "resnet20"):  # --model naming the same architecture changes nothing
        loaded = load_pretrained_source(tmp_path / "last.pt", model)
        assert loaded.config.mean == (0.3, 0.3, 0.3) and loaded.config.label_names == ("a", "b", "c")
        torch.testing.assert_close(loaded.state_dict(), net.state_dict())
    with pytest.raises(WeightsError, match="checkpoint of resnet20, not resnet56"):
        load_pretrained_source(tmp_path / "last.pt", "resnet56")


def test_an_invalid_torchvision_weights_name_lists_the_valid_ones() -> None:
    with pytest.raises(WeightsError, match=r"ResNet18_Weights\.IMAGENET1K_V1"):
        load_pretrained_source("ResNet18_Weights.BOGUS")
    with pytest.raises(WeightsError, match="no weights for resnet50d"):
        load_pretrained_source("ResNet50d_Weights.IMAGENET1K_V1")


@pytest.mark.slow
def test_an_interrupted_finetune_resumes_its_strategy_and_ends_identical(
    source_dir: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Gradual unfreezing over 3 epochs of 6 steps, stopped by SIGTERM in the middle of epoch 2: resuming
    continues the saved strategy and ends with the weights of an uninterrupted run."""
    import os
    import signal

    from resnetlab.train import TrainingInterrupted, load_checkpoint

    # one lr for all parts: newly unfrozen parameters join a group whose others have momentum already
    strategy = FinetuneStrategy(mode="full", bn="eval", unfreeze_every=1)

    def cfg(name: str):
        return load_recipe("finetune", data=str(folder), pretrained=str(source_dir), image_size=16, batch_size=8,
                           epochs=3, warmup_iters=0, deterministic=True, tensorboard=False, progress=False,
                           num_workers=0, run_dir=str(tmp_path / name))  # fmt: skip

    reference = finetune(cfg("straight"), strategy)

    def stop_at_step_8(info) -> None:
        if info.step == 8:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted):
        finetune(cfg("stopped"), strategy, callbacks=[stop_at_step_8])
    assert main(["train", "--resume", str(tmp_path / "stopped")]) == 1  # not a plain training run
    assert "resume it with resnetlab finetune --resume" in capsys.readouterr().err
    assert main(["finetune", "--resume", str(tmp_path / "stopped"), "--mode", "linear"]) == 1
    assert "drop --mode" in capsys.readouterr().err  # the saved strategy is the one that continues
    # what a restarted torchrun worker does: the same call, with auto_resume (the data settings the run
    # resolved from its model are filled in from the checkpoint)
    finetune(cfg("stopped").replace(auto_resume=True), strategy)
    assert main(["finetune", "--resume", str(tmp_path / "stopped"), "--json"]) == 0  # finished: nothing to do
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["steps"] == 18
    assert [h["trainable"] for h in resumed["history"]] == [["head"], ["layer3", "head"], ["layer2", "layer3", "head"]]
    assert [h["trainable"] for h in resumed["history"]] == [h["trainable"] for h in reference.history]
    expected = load_checkpoint(reference.run_dir / "checkpoints" / "last.pt")["model"]
    got = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resnetlab.from_pretrained(resumed["model_dir"]).config.label_names == ("blue", "red")


def test_cli_reports_a_torchvision_weights_name_it_cannot_get(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    code = main(["finetune", "--from", "ResNet18_Weights.IMAGENET1K_V1", "--data", "digits", "--max-iters", "1"])
    assert code == 1
    assert "could not download" in capsys.readouterr().err


def _offline(*args: object, **kwargs: object) -> None:
    raise OSError("no internet")
