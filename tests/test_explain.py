"""resnetlab.explain and `resnetlab explain`: maps of the right shape and range for every method and stage
of the family, hooks that leave the model as it was, a CLI that writes overlays and maps and says one line
when it cannot, and checks that the maps follow the model (randomisation) and the object (pointing game)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import resnetlab
from resnetlab.cli.main import main
from resnetlab.errors import ConfigError, InputError
from resnetlab.explain import METHODS, explain, grad_cam, overlay, stage_count, stage_module
from resnetlab.explain.checks import (
    correctly_classified,
    make_mosaics,
    normalise_uint8,
    pointing_game,
    quadrant_hits,
    randomisation_check,
)

# Small members of each kind: post-activation basic (CIFAR, option A), bottleneck (ImageNet stem),
# pre-activation basic and bottleneck.
FAMILY = {
    "resnet8": {},
    "resnet50": dict(layers=(1, 1, 1, 1), widths=(4, 8, 8, 16)),
    "preact_resnet18": dict(layers=(1, 1, 1, 1), widths=(4, 8, 8, 16)),
    "preact_resnet50": dict(layers=(1, 1, 1, 1), widths=(4, 8, 8, 16)),
}


def small_model(name: str, num_classes: int = 5) -> resnetlab.ResNet:
    torch.manual_seed(0)
    return resnetlab.create_model(name, num_classes=num_classes, **FAMILY[name])


@pytest.mark.parametrize("name", sorted(FAMILY))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_and_stage_gives_maps_in_unit_range(name, method) -> None:
    model = small_model(name).train()
    x = torch.randn(2 if METHODS[method][0] else 1, 3, 40, 36)  # the gradient-free methods make many passes
    params = {k: v.clone() for k, v in model.state_dict().items()}
    stages = [None] if method == "occlusion" else [*range(1, stage_count(model) + 1), -1]
    for stage in stages:
        maps = explain(model, x, method, stage=stage, batch_size=16)
        assert maps.shape == (len(x), 40, 36)
        assert float(maps.min()) >= 0 and float(maps.max()) <= 1
        assert torch.isfinite(maps).all()
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # nothing written into the parameters
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())  # hooks removed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())  # BN statistics untouched


def test_last_stage_of_preact_nets_is_after_the_final_norm_and_relu() -> None:
    model = small_model("preact_resnet18")
    assert stage_module(model, stage_count(model)) is model.final_act
    assert stage_module(model, 2) is model.layer2
    # The map equals Grad-CAM computed by hand on forward_features (what the head pools), not on layer4.
    x = torch.randn(1, 3, 64, 64)
    features = model.eval().forward_features(x).detach().requires_grad_(True)
    logits = model.forward_head(features)
    target = int(logits.argmax())
    (grads,) = torch.autograd.grad(logits[0, target], features)
    by_hand = (grads.mean((2, 3), keepdim=True) * features).sum(1, keepdim=True).clamp_min(0)
    by_hand = torch.nn.functional.interpolate(by_hand, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    by_hand = (by_hand - by_hand.min()) / (by_hand.max() - by_hand.min())
    torch.testing.assert_close(grad_cam(model, x)[0], by_hand, atol=1e-5, rtol=1e-4)


def test_target_defaults_to_the_predicted_class_and_changes_the_map() -> None:
    model = small_model("resnet8").eval()
    x = torch.randn(3, 3, 32, 32)
    predicted = model(x).argmax(1)
    torch.testing.assert_close(grad_cam(model, x), grad_cam(model, x, target=predicted))
    other = (predicted + 1) % 5
    assert not torch.allclose(grad_cam(model, x), grad_cam(model, x, target=other))


def test_frozen_model_and_no_grad_context_still_explain() -> None:
    model = small_model("resnet8").eval().requires_grad_(False)
    with torch.no_grad():
        maps = grad_cam(model, torch.randn(1, 3, 32, 32))
    assert float(maps.max()) == pytest.approx(1.0)


def test_bad_stage_and_class_are_clear_errors() -> None:
    model = small_model("resnet8")
    with pytest.raises(ConfigError, match=r"stages 1\.\.3"):
        grad_cam(model, torch.randn(1, 3, 32, 32), stage=4)
    with pytest.raises(ConfigError, match=r"classes 0\.\.4"):
        grad_cam(model, torch.randn(1, 3, 32, 32), target=7)
    with pytest.raises(ConfigError, match="unknown method"):
        explain(model, torch.randn(1, 3, 32, 32), "lime")


def test_occlusion_finds_the_patch_a_rigged_model_looks_at() -> None:
    """A model whose logit 0 is the mean of the top-left 8x8 corner: occlusion must light that corner only."""

    class Corner(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            corner = x[:, :, :8, :8].mean((1, 2, 3))
            return torch.stack([corner, torch.zeros_like(corner)], 1)

    x = torch.ones(1, 3, 32, 32) * 3
    maps = explain(Corner(), x, "occlusion", target=0)[0]
    assert maps[:8, :8].mean() > 0.5 and float(maps[16:, 16:].max()) == 0


def test_overlay_draws_caption_and_heat_map() -> None:
    photo = Image.new("RGB", (32, 32), (128, 128, 128))
    cam = np.zeros((32, 32), dtype=np.float32)
    cam[:16, :16] = 1
    plain = overlay(photo, cam)
    assert plain.size == (256, 256)
    pixels = np.asarray(plain).astype(int)
    assert abs(pixels[200, 200] - 128).max() <= 1  # a zero map leaves the photo as it was
    red, green, blue = pixels[40, 40]
    assert red - green > 50 and red - blue > 50  # the hot corner is tinted with the colour map's top (red)
    captioned = overlay(photo, torch.from_numpy(cam), label="cat", probability=0.87)
    assert captioned.width == 256 and captioned.height > 256
    band = np.asarray(captioned)[256:]
    assert (band < 100).any()  # there is text in the caption band
    with pytest.raises(InputError):
        overlay(photo, np.zeros((2, 3, 4)))


# ---------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    resnetlab.save_pretrained(resnetlab.create_model("resnet8", num_classes=3, label_names=("red", "green", "blue")),
                              folder)  # fmt: skip
    return folder


def _images(folder, count=2):
    paths = []
    for i in range(count):
        path = folder / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_cli_writes_overlay_and_map_per_image(model_dir, tmp_path, capsys) -> None:
    images = _images(tmp_path)
    out = tmp_path / "out"
    code = main(["explain", "--from", str(model_dir), *map(str, images), "--out", str(out), "--target", "Green",
                 "--stage", "2", "--json"])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "gradcam" and report["stage"] == 2
    assert [r["class"] for r in report["explained"]] == ["green", "green"]
    for r in report["explained"]:
        cam = np.load(r["map"])
        assert cam.shape == (32, 32) and cam.dtype == np.float32 and cam.min() >= 0 and cam.max() <= 1
        assert Image.open(r["overlay"]).width == 256


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys) -> None:
    (image,) = _images(tmp_path, 1)
    base = ["explain", "--from", str(model_dir), str(image), "--out", str(tmp_path / "o")]
    for extra, words in ((["--stage", "9"], "stages 1..3"), (["--target", "purple"], "not one of the model's"),
                         (["--target", "5"], "classes 0..2")):  # fmt: skip
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    assert main(["explain", "--from", str(model_dir), str(bad), str(image), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "1 of 2 input(s) could not be read" in err and "Traceback" not in err
    assert (tmp_path / "p" / "img0.png").is_file()  # the readable image was still explained


def test_cli_export_without_gradients_uses_occlusion_or_refuses(model_dir, tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    onnx = tmp_path / "model.onnx"
    assert main(["export", "--from", str(model_dir), "--format", "onnx", "--out", str(onnx)]) == 0
    (image,) = _images(tmp_path, 1)
    capsys.readouterr()
    assert main(["explain", "--from", str(onnx), str(image), "--out", str(tmp_path / "o"), "--method", "gradcam"]) == 1
    assert "use --method occlusion" in capsys.readouterr().err
    assert main(["explain", "--from", str(onnx), str(image), "--out", str(tmp_path / "o"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "occlusion" and np.load(report["explained"][0]["map"]).shape == (32, 32)


# ---------------------------------------------------------------------------- the maps mean something
def test_quadrant_hits_score_peaks_and_split_ties() -> None:
    maps = torch.zeros(1, 4, 8, 8)
    maps[0, 0, 1, 1] = 1  # in its own quadrant (top-left)
    maps[0, 1, 6, 1] = 1  # bottom-left, not its own (top-right)
    maps[0, 3, 5, 5] = 1  # bottom-right: hit; map 2 stays flat: 1/4
    assert quadrant_hits(maps).tolist() == [[1.0, 0.0, 0.25, 1.0]]


@pytest.fixture(scope="module")
def cifar_resnet56(shared_file):
    """The published CIFAR ResNet-56, through the same source loader the CLI uses, and CIFAR test images."""
    from resnetlab.data import build_data
    from resnetlab.sources import load_model

    model = load_model(shared_file("weights/cifar10-akamaster/resnet56-4bfd9763.th")).eval()
    bundle = build_data(shared_file("data/cifar10-jpeg.tar.xz"), augment="none")
    # every 5th test image: 200 of each class (the test set is stored class by class)
    images = normalise_uint8(bundle.test.images[::5], model.config.mean, model.config.std)
    return model, images, torch.tensor(bundle.test.targets[::5])


@pytest.mark.shared
def test_randomisation_check_maps_depend_on_the_weights(cifar_resnet56) -> None:
    """Trained vs re-initialised Grad-CAM maps: a map that ignored the weights (an edge detector) would have a
    median Spearman correlation near 1, one that follows them near 0. Measured (docs/results/explain.md, 32
    images): |median| <= 0.08 at every stage; the bound 0.3 leaves room for other 32-image samples."""
    model, images, labels = cifar_resnet56
    for stage in (2, 3):
        result = randomisation_check(model, images[:32], labels[:32], method="gradcam", stage=stage)
        assert abs(result.median) < 0.3, result.to_dict()


@pytest.mark.shared
def test_pointing_game_beats_chance_by_far(cifar_resnet56) -> None:
    """Grad-CAM at the last stage must peak in the right quadrant far more often than chance (1/4): with 40
    mosaics (160 quadrants) chance gives 0.25 ± 0.034 (binomial sd), so 0.5 is more than 7 sd above it.
    Measured (docs/results/explain.md): 0.965 on 200 mosaics."""
    model, images, labels = cifar_resnet56
    ok = correctly_classified(model, images, labels)
    mosaics, classes = make_mosaics(images[ok], labels[ok], 40, seed=1)
    result = pointing_game(model, mosaics, classes, method="gradcam")
    assert result.rate > 0.5, result.to_dict()
    # and the map is of the class: the same maps scored against a wrong quadrant are at or below chance
    shifted = pointing_game(model, mosaics, classes.roll(1, dims=1), method="gradcam")
    assert shifted.rate < 0.3, shifted.to_dict()


def test_cli_method_choices_are_the_library_methods() -> None:
    from resnetlab.cli.explain import METHOD_NAMES

    assert tuple(METHODS) == METHOD_NAMES


def test_docs_figure_script_draws_a_row_per_image(model_dir, tmp_path, monkeypatch, capsys) -> None:
    """docs/results/explain_figure.py (the docs' figure on one's own photos): one row per image, a column per
    method after the photo."""
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "docs" / "results"))
    sys.modules.pop("explain_figure", None)
    import explain_figure

    out = tmp_path / "figure.png"
    assert explain_figure.main(["--from", str(model_dir), *map(str, _images(tmp_path, 3)), "--out", str(out)]) == 0
    width, height = Image.open(out).size
    assert str(out) in capsys.readouterr().out
    assert width > height > 0 and abs(width / height - (len(METHODS) + 1) * 2.1 / (3 * 2.3)) < 0.1
