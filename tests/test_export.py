"""Exports run elsewhere and compute what PyTorch computes; BN folding is exact; artifacts are verified."""

from __future__ import annotations

import json
import os

import pytest
import torch

import resnetlab
from resnetlab.cli.main import main
from resnetlab.errors import ConfigError, WeightsError
from resnetlab.export import export_model, fold_batchnorm, max_difference, read_export
from resnetlab.filetypes import sniff
from resnetlab.inference import Predictor
from resnetlab.models.layers import StdConv2d


def _with_stats(name: str, **options) -> resnetlab.ResNet:
    torch.manual_seed(0)
    model = resnetlab.create_model(name, **options).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def _calibrated(name: str, **options) -> resnetlab.ResNet:
    """BN statistics measured on a batch: behind weight-standardised convs, made-up ones blow activations up."""
    torch.manual_seed(0)
    model = resnetlab.create_model(name, **options)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0  # the running statistics become this batch's
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
    return model.eval()


def _folds_exactly(model: resnetlab.ResNet, pairs: int) -> resnetlab.ResNet:
    """``fold_batchnorm(model)``, checked: ``pairs`` folded, and the same outputs up to rounding."""
    x = torch.randn(2, 3, 32, 32)
    folded, count = fold_batchnorm(model)
    assert count == pairs
    with torch.no_grad():
        reference = model(x)
        assert (folded(x) - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())
    return folded


@pytest.mark.parametrize(
    ("name", "pairs"), [("resnet20", 19), ("resnet18", 20), ("resnet50d", 55), ("preact_resnet18", 0)]
)
def test_fold_batchnorm_is_numerically_exact(name: str, pairs: int) -> None:
    folded = _folds_exactly(_with_stats(name), pairs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for b in folded.blocks() for m in b.modules()) or pairs == 0


@pytest.mark.parametrize(("name", "pairs"), [("resnet18", 20), ("resnet50d", 55)])
def test_fold_batchnorm_into_weight_standardised_convs_is_exact(name: str, pairs: int) -> None:
    # A StdConv2d standardises its weight at every call: writing BN's scale into that weight would be
    # undone by the next standardisation, so a fold must first materialise the weight it really uses.
    folded = _folds_exactly(_calibrated(name, conv_layer="std_conv"), pairs)
    assert not any(isinstance(m, StdConv2d) for m in folded.modules())  # every one was followed by a BN


def test_fold_batchnorm_leaves_the_bit_row_and_its_group_norms_alone() -> None:
    model = _with_stats("resnetv2_50x1_bit", num_classes=5)
    x = torch.randn(1, 3, 32, 32)
    folded, count = fold_batchnorm(model)
    assert count == 0
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))


def test_export_of_a_weight_standardised_net_with_folded_bn_matches_pytorch(tmp_path) -> None:
    model = _calibrated("resnet8", conv_layer="std_conv")
    path = export_model(model, tmp_path / "m.onnx", "onnx", fold_bn=True)
    assert max_difference(model, path, torch.randn(2, 3, 32, 32)) <= 1e-4
    assert read_export(path)["folded_pairs"] == 7


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported-program"])
def test_exports_match_pytorch_with_a_dynamic_batch(fmt: str, tmp_path) -> None:
    model = _with_stats("resnet8", num_classes=4, label_names=tuple("abcd"))
    path = export_model(model, tmp_path / f"m.{fmt}", fmt, fold_bn=True)
    for batch in (1, 5):
        assert max_difference(model, path, torch.randn(batch, 3, 32, 32)) <= 1e-4
    meta = read_export(path)
    assert meta["config"]["label_names"] == list("abcd") and meta["folded_pairs"] == 7
    assert sniff(path) == fmt  # the content is recognised from the bytes, whatever the name (here m.<fmt>)
    program = fmt != "onnx"  # TorchScript and .pt2 run code they carry: they load only when allowed
    prediction = Predictor.load(path, allow_program=program).predict_tensors(torch.randn(1, 3, 32, 32), top_k=2)[0]
    assert set(prediction.labels) <= set("abcd")
    if program:
        with pytest.raises(WeightsError, match="--allow-program"):
            Predictor.load(path)


def test_altered_artifact_is_refused(tmp_path) -> None:
    path = export_model(resnetlab.create_model("resnet8"), tmp_path / "m.pt2", "exported-program")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        read_export(path)
    path.with_name("m.pt2.json").unlink()
    with pytest.raises(WeightsError, match="no metadata"):
        read_export(path)


def test_a_failed_export_leaves_the_previous_one_intact(tmp_path, monkeypatch) -> None:
    import resnetlab.export.artifacts as artifacts

    path = export_model(resnetlab.create_model("resnet8"), tmp_path / "m.onnx")
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    assert sorted(before) == ["m.onnx", "m.onnx.json"]

    def dies_halfway(net, example, target, opset=None):  # a full disk, a crash, a converter error ...
        target.write_bytes(b"half an onnx file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts, "onnx_export", dies_halfway)
    with pytest.raises(OSError, match="No space"):
        export_model(resnetlab.create_model("resnet8", num_classes=3), path)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # no temporary file left either
    assert read_export(path)["config"]["num_classes"] == 10
    (tmp_path / ".m.tmp-999.onnx").write_bytes(b"left by an export that was killed")
    (tmp_path / ".m.onnx.json.tmp-999").write_text("{")
    monkeypatch.undo()
    export_model(resnetlab.create_model("resnet8", num_classes=3), path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # cleared by the next one
    assert read_export(path)["config"]["num_classes"] == 3


def test_int8_quantized_onnx_agrees_with_fp32(tmp_path) -> None:
    model = _with_stats("resnet8")
    calibration = torch.randn(64, 3, 32, 32)
    path = export_model(model, tmp_path / "q.onnx", "onnx", fold_bn=True, quantize="int8", calibration=calibration)
    assert read_export(path)["quantize"] == "int8"
    x = torch.randn(32, 3, 32, 32)
    int8 = Predictor.load(path).logits(x).argmax(1)
    fp32 = model(x).argmax(1)
    assert (int8 == fp32).float().mean() >= 0.8
    with pytest.raises(ConfigError, match="onnx"):
        export_model(model, tmp_path / "q.pt", "torchscript", quantize="int8", calibration=calibration)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_onnx_file_carries_labels_and_preprocessing_without_its_sidecar(quantize, tmp_path) -> None:
    import onnxruntime as ort

    model = _with_stats("resnet8", num_classes=4, label_names=tuple("abcd"), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    calibration = torch.randn(8, 3, 32, 32) if quantize else None
    path = export_model(model, tmp_path / "m.onnx", "onnx", quantize=quantize, calibration=calibration)
    path.with_name("m.onnx.json").unlink()  # a user who has only the .onnx
    props = ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map
    assert json.loads(props["labels"]) == list("abcd")
    assert json.loads(props["mean"]) == [0.1, 0.2, 0.3] and json.loads(props["std"]) == [0.4, 0.5, 0.6]
    assert json.loads(props["input_size"]) == [3, 32, 32] and props["interpolation"] == "bilinear"
    assert json.loads(props["crop_pct"]) == model.config.crop_pct and props["architecture"] == "resnet8"
    assert json.loads(props["resnetlab_config"]) == json.loads(json.dumps(model.config.to_dict()))


def test_cli_export_json(tmp_path, capsys) -> None:
    folder = tmp_path / "model"
    resnetlab.save_pretrained(resnetlab.create_model("resnet8"), folder)
    out = tmp_path / "cli.onnx"
    assert main(["export", "--from", str(folder), "--out", str(out), "--fold-bn", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_difference"] <= 1e-4 and out.is_file()


def test_export_out_naming_a_folder_is_a_clear_error_that_leaves_nothing(tmp_path, capsys) -> None:
    folder = tmp_path / "model"
    resnetlab.save_pretrained(resnetlab.create_model("resnet8"), folder)
    target = tmp_path / "exports"
    target.mkdir()
    assert main(["export", "--from", str(folder), "--out", str(target), "--format", "torchscript"]) == 1
    err = capsys.readouterr().err
    assert f"{target} is a folder; name the file to write, e.g. {target / 'model.pt'}" in err
    assert "Traceback" not in err and list(target.iterdir()) == [] and sorted(os.listdir(tmp_path)) == [
        "exports", "model"
    ]  # fmt: skip


def test_the_cli_formats_are_the_library_table() -> None:
    from resnetlab.cli.main import build_parser
    from resnetlab.export import EXPORT_FORMATS, FORMATS

    [export] = [a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("export")]
    [fmt] = [a for a in export._actions if a.dest == "format"]
    assert list(fmt.choices) == list(EXPORT_FORMATS) == list(FORMATS)
    assert FORMATS["exported-program"] == EXPORT_FORMATS["exported-program"].suffix == ".pt2"
