"""TFLite (checked numerically through LiteRT) and Core ML (checked structurally: it runs only on macOS).

These need the optional extras resnetlab[tflite] / resnetlab[coreml]; without them the tests skip with
that reason.
"""

from __future__ import annotations

import json

import pytest
import torch

import resnetlab
from resnetlab.export import export_model, max_difference, read_export
from resnetlab.export.mobile import to_coreml


def test_tflite_matches_pytorch(tmp_path) -> None:
    pytest.importorskip("litert_torch", reason="needs the extra resnetlab[tflite]")
    model = resnetlab.create_model("resnet8", num_classes=4).eval()
    path = export_model(model, tmp_path / "m.tflite", "tflite")
    assert read_export(path)["format"] == "tflite"
    assert max_difference(model, path, torch.randn(1, 3, 32, 32)) <= 1e-4


def test_coreml_spec_is_valid(tmp_path) -> None:
    pytest.importorskip("coremltools", reason="needs the extra resnetlab[coreml]")
    model = resnetlab.create_model("resnet8", num_classes=4).eval()
    facts = to_coreml(model, tmp_path / "m.mlpackage")
    assert facts["inputs"] == {"input": [1, 3, 32, 32]} and facts["outputs"] == {"logits": [1, 4]}
    assert facts["operations"] > 20
    path = export_model(model, tmp_path / "m2", "coreml")
    assert path.suffix == ".mlpackage" and json.loads(path.with_name(path.name + ".json").read_text())["sha256"]
    read_export(path)  # the sha256 over the package's files verifies
