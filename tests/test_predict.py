"""resnetlab predict: any image mode, EXIF rotation, bad files skipped, CSV for folders, JSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageOps

import resnetlab
from resnetlab.cli.main import main
from resnetlab.data import CIFAR10_CLASSES
from resnetlab.inference import Predictor
from resnetlab.models.hub import dataset_labels
from resnetlab.models.registry import MODELS, get_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    resnetlab.save_pretrained(resnetlab.create_model("resnet8", num_classes=4, label_names=tuple("abcd")), folder)
    return folder


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8"))
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((rng.random((40, 40)) * 65535).astype("uint16")).save(folder / "sub" / "deep16.png")
    exif = rgb.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    rgb.save(folder / "sub" / "rotated.jpg", exif=exif)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def test_predict_folder_writes_csv_and_skips_bad_files(model_dir, images, tmp_path, capsys) -> None:
    out = tmp_path / "p.csv"
    assert main(["predict", "--from", str(model_dir), str(images), "--csv", str(out), "--top-k", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["predictions"]) == 5
    assert [s["file"].split("/")[-1] for s in report["skipped"]] == ["broken.jpg"]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {r["label1"] for r in rows} <= set("abcd")


def _by_hand(path, size: int, resize: int, mean, std) -> torch.Tensor:
    """The eval preprocessing written out with torchvision's functional API: shorter side to ``resize``,
    center crop ``size``, scale to [0, 1], normalise."""
    image = F.pil_to_tensor(Image.open(path).convert("RGB"))
    if resize != image.shape[-1] or size != image.shape[-2]:
        image = F.center_crop(F.resize(image, resize, antialias=True), size)
    return F.normalize(image.float() / 255, mean, std)


def test_predictor_matches_the_model_and_orders_probabilities(model_dir, images) -> None:
    predictor = Predictor.load(model_dir)
    [prediction] = predictor.predict([images / "grey.png"], top_k=4)
    assert sorted(prediction.labels) == list("abcd")
    assert prediction.probabilities == sorted(prediction.probabilities, reverse=True)
    assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-5)
    model = resnetlab.from_pretrained(model_dir).eval()
    with torch.no_grad():  # resnet8: 32x32 input, crop_pct 1 -> shorter side 32, center crop
        expected = model(_by_hand(images / "grey.png", 32, 32, model.config.mean, model.config.std)[None])
    probabilities = expected.softmax(1)[0]
    assert prediction.indices == probabilities.argsort(descending=True).tolist()
    assert prediction.probabilities == pytest.approx(probabilities.sort(descending=True).values.tolist(), abs=1e-5)
    assert prediction.labels == ["abcd"[i] for i in prediction.indices]


def test_saved_size_crop_and_normalisation_are_applied(tmp_path, images) -> None:
    mean, std = (0.1, 0.2, 0.3), (0.9, 0.8, 0.7)
    model = resnetlab.create_model("resnet8", input_size=(3, 40, 40), mean=mean, std=std, crop_pct=0.8)
    resnetlab.save_pretrained(model, tmp_path / "m")
    predictor = Predictor.load(tmp_path / "m")
    tensor = predictor.preprocess(images / "sub" / "rotated.jpg")
    rotated = tmp_path / "upright.png"  # EXIF orientation applied, as the loader does
    ImageOps.exif_transpose(Image.open(images / "sub" / "rotated.jpg")).save(rotated)
    expected = _by_hand(rotated, 40, 50, mean, std)  # shorter side 40 / 0.8 = 50, then the 40x40 center
    assert tensor.shape == (3, 40, 40)
    assert (tensor - expected).abs().max() <= 1e-5
    with torch.no_grad():
        assert (predictor.logits(tensor[None]) - model.eval()(expected[None])).abs().max() <= 1e-4


def test_folder_csv_never_overwrites_by_default(model_dir, images, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "predictions.csv").write_text("earlier results\n")
    (tmp_path / "predictions-1.csv").write_text("more earlier results\n")
    assert main(["predict", "--from", str(model_dir), str(images)]) == 0
    out = capsys.readouterr().out
    assert "wrote predictions-2.csv" in out and "predictions.csv was already there" in out
    assert len((tmp_path / "predictions-2.csv").read_text().splitlines()) == 6  # header + 5 readable images
    assert (tmp_path / "predictions-1.csv").read_text() == "more earlier results\n"
    assert (tmp_path / "predictions.csv").read_text() == "earlier results\n"
    explicit = tmp_path / "predictions.csv"  # an explicit --csv path is the user's choice: it is written
    assert main(["predict", "--from", str(model_dir), str(images), "--csv", str(explicit), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["csv"] == str(explicit)
    assert explicit.read_text().startswith("file,label1,prob1")


@pytest.mark.slow
def test_published_weights_carry_class_names(tmp_path, monkeypatch) -> None:
    """ImageNet heads from timm/Hugging Face get torchvision's ImageNet names (same label order)."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    from torchvision.models import ResNet18_Weights

    save_file(timm.create_model("resnet18d").state_dict(), str(tmp_path / "timm--resnet18d.ra2_in1k.safetensors"))
    monkeypatch.setenv("RESNETLAB_WEIGHTS_PATH", str(tmp_path))  # found here instead of downloaded
    predictor = Predictor(resnetlab.create_model("resnet18d", pretrained="timm_in1k"))
    assert predictor.labels == list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    assert predictor.labels[:2] == ["tench", "goldfish"]
    for name in resnetlab.list_models():  # and every other published head names its classes
        for tag, source in MODELS[name].weights.items():
            if source.kind == "torchvision":  # torchvision's weights bring their own names
                continue
            classes = source.config.get("num_classes", get_config(name).num_classes)
            if source.labels is None:  # ImageNet-21k/12k heads: no class names offline, but their size is declared
                assert classes != get_config(name).num_classes and tag.endswith(("in21k", "in12k")), (name, tag)
                continue
            assert len(dataset_labels(source.labels)) == classes, (name, tag)


@pytest.mark.shared
def test_cifar10_akamaster_predicts_cifar10_names(shared_file, monkeypatch) -> None:
    monkeypatch.setenv("RESNETLAB_WEIGHTS_PATH", str(shared_file("weights/cifar10-akamaster")))
    predictor = Predictor.load("resnet20", pretrained="cifar10_akamaster")
    assert tuple(predictor.labels) == CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                                          "frog", "horse", "ship", "truck")  # fmt: skip


def test_missing_input_is_a_clear_error(model_dir, capsys) -> None:
    assert main(["predict", "--from", str(model_dir), "/nonexistent/image.jpg"]) == 1
    assert "no such file" in capsys.readouterr().err
