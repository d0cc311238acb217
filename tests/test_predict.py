"""resnetlab predict: any image mode, EXIF rotation, bad files skipped, CSV for folders, JSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

import resnetlab
from resnetlab.cli.main import main
from resnetlab.inference import Predictor


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


def test_predictor_matches_the_model_and_orders_probabilities(model_dir, images) -> None:
    predictor = Predictor.load(model_dir)
    [prediction] = predictor.predict([images / "grey.png"], top_k=4)
    assert sorted(prediction.labels) == list("abcd")
    assert prediction.probabilities == sorted(prediction.probabilities, reverse=True)
    assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_missing_input_is_a_clear_error(model_dir, capsys) -> None:
    assert main(["predict", "--from", str(model_dir), "/nonexistent/image.jpg"]) == 1
    assert "no such file" in capsys.readouterr().err
