"""TFLite (checked numerically through LiteRT) and Core ML (checked structurally: it runs only on macOS).

These need the optional extras resnetlab[tflite] / resnetlab[coreml]; without them the tests skip with
that reason (docs/deployment.md: what installing them takes), unless RESNETLAB_MOBILE_EXTRAS=1 (a CI job
that installs the extras), where a missing converter fails the run.
"""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

import resnetlab
from resnetlab.cli.main import main
from resnetlab.export import export_model, max_difference, read_export
from resnetlab.export.mobile import to_coreml
from resnetlab.inference import Predictor


def _need(module: str, extra: str) -> None:
    if os.environ.get("RESNETLAB_MOBILE_EXTRAS") == "1":
        importlib.import_module(module)  # an ImportError fails the test
    else:
        pytest.importorskip(module, reason=f"needs the extra resnetlab[{extra}]")


def test_tflite_matches_pytorch_at_any_batch(tmp_path) -> None:
    _need("litert_torch", "tflite")
    model = resnetlab.create_model("resnet8", num_classes=4, label_names=tuple("abcd")).eval()
    path = export_model(model, tmp_path / "m.tflite", "tflite")
    meta = read_export(path)
    assert meta["format"] == "tflite" and meta["validated"]["input_shape"] == [1, 3, 32, 32]
    assert meta["validated"]["max_abs_difference"] <= 1e-4
    for batch in (1, 3):  # the artifact's batch is fixed at 1; larger batches run in slices
        assert max_difference(model, path, torch.randn(batch, 3, 32, 32)) <= 1e-4
    predictions = Predictor.load(path).predict_tensors(torch.randn(5, 3, 32, 32), top_k=2)  # predict/serve batches
    assert len(predictions) == 5 and all(set(p.labels) <= set("abcd") for p in predictions)


def test_coreml_spec_is_valid_and_reported(tmp_path, capsys) -> None:
    _need("coremltools", "coreml")
    model = resnetlab.create_model("resnet8", num_classes=4).eval()
    facts = to_coreml(model, tmp_path / "m.mlpackage")
    assert facts["inputs"] == {"input": [1, 3, 32, 32]} and facts["outputs"] == {"logits": [1, 4]}
    assert facts["operations"] > 20
    path = export_model(model, tmp_path / "m2", "coreml")
    assert path.suffix == ".mlpackage" and json.loads(path.with_name(path.name + ".json").read_text())["sha256"]
    assert read_export(path)["validated"]["operations"] == facts["operations"]  # the sha256 verifies too
    resnetlab.save_pretrained(model, tmp_path / "folder")
    out = tmp_path / "cli.mlpackage"
    assert main(["export", "--from", str(tmp_path / "folder"), "--format", "coreml", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_difference"] is None  # running a Core ML model needs macOS
    assert report["validated"]["inputs"] == {"input": [1, 3, 32, 32]} and report["validated"]["outputs"]
    assert main(["export", "--from", str(tmp_path / "folder"), "--format", "coreml", "--out", str(out)]) == 0
    assert "Core ML spec validated: input [1, 3, 32, 32] -> logits [1, 4]" in capsys.readouterr().out
