"""One source resolver: content decides the loader, programs need an opt-in, names need weights,
published files bring their metadata, and a missing --data is named (issue 15: D1, silent wrong answers)."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resnetlab
from colour_folders import write_colour_folder
from resnetlab.cli.main import main
from resnetlab.data import CIFAR10_CLASSES
from resnetlab.errors import ConfigError, WeightsError
from resnetlab.export import export_model
from resnetlab.export.artifacts import sha256_path, sidecar
from resnetlab.filetypes import sniff
from resnetlab.inference import Predictor
from resnetlab.sources import load_model, model_for_image_size, resolve_source


class Evil:
    """A pickle that runs a shell command when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    resnetlab.save_pretrained(resnetlab.create_model("resnet8", num_classes=4, label_names=tuple("abcd")), folder)
    return folder


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(path)
    return path


def _evil_program(tmp_path: Path, marker: Path, *, sidecar_format: str) -> Path:
    """The issue's reproduction: a .pt2 whose sample inputs are a malicious pickle, renamed ``evil.onnx``,
    with a sidecar that matches its sha256."""
    model = resnetlab.create_model("resnet8", num_classes=4)
    program = export_model(model, tmp_path / "m.pt2", "exported-program")
    payload = io.BytesIO()
    torch.save((Evil(marker),), payload)
    evil = tmp_path / "evil.onnx"
    with zipfile.ZipFile(program) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            member = item.filename.endswith("data/sample_inputs/model.pt")
            dst.writestr(item, payload.getvalue() if member else src.read(item))
    meta = json.loads(sidecar(program).read_text())
    meta.update(format=sidecar_format, sha256=sha256_path(evil))
    sidecar(evil).write_text(json.dumps(meta))
    return evil


@pytest.mark.parametrize("sidecar_format", ["exported-program", "onnx"])
def test_a_program_renamed_onnx_never_runs(sidecar_format: str, tmp_path: Path, image: Path,
                                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    marker = tmp_path / "PWNED"
    evil = _evil_program(tmp_path, marker, sidecar_format=sidecar_format)
    for extra in ([], ["--allow-program"]):  # a file named .onnx is only ever opened by ONNX Runtime
        assert main(["predict", "--from", str(evil), str(image), *extra]) == 1
        err = capsys.readouterr().err
        assert "evil.onnx is named as an ONNX model (protobuf) but holds a torch.export program" in err
        assert "Traceback" not in err and "weights_only" not in err
    with pytest.raises(WeightsError, match=r"holds a torch\.export program"):
        Predictor.load(evil, allow_program=True)
    assert not marker.exists()


def test_programs_load_only_with_the_opt_in(model_dir: Path, tmp_path: Path, image: Path,
                                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    path = export_model(resnetlab.from_pretrained(model_dir), tmp_path / "m.pt", "torchscript")
    assert main(["predict", "--from", str(path), str(image)]) == 1
    assert "--allow-program (allow_program=True in Python)" in capsys.readouterr().err
    assert main(["predict", "--from", str(path), str(image), "--allow-program"]) == 0
    assert capsys.readouterr().out.split(": ")[1][0] in "abcd"


def test_no_message_suggests_unpickling(tmp_path: Path, image: Path, capsys: pytest.CaptureFixture) -> None:
    lone = tmp_path / "m.onnx"  # an ONNX file without its sidecar (how torch's ONNX files begin): never torch.load-ed
    lone.write_bytes(b"\x08\n\x12\x07pytorch" + bytes(64))
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": Evil(marker)}, tmp_path / "evil.pth")  # a pickle with code, as weights
    weights = ["resnet8", "--pretrained", str(tmp_path / "evil.pth")]
    for source, expected in (([str(lone)], "without its metadata file m.onnx.json"), (weights, "never unpickles code")):
        assert main(["predict", "--from", *source, str(image)]) == 1
        err = capsys.readouterr().err
        assert expected in err and "weights_only" not in err and "Traceback" not in err
    assert not marker.exists()


def test_content_and_extension_must_agree(model_dir: Path, tmp_path: Path) -> None:
    model = resnetlab.from_pretrained(model_dir)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    assert sniff(tmp_path / "w.pth") == "torch"
    (tmp_path / "w.onnx").write_bytes((tmp_path / "w.pth").read_bytes())  # tensors dressed as ONNX
    with pytest.raises(WeightsError, match=r"named as an ONNX model .* but holds PyTorch tensors"):
        load_model(tmp_path / "w.onnx")
    os.mkfifo(tmp_path / "pipe.pt")
    with pytest.raises(WeightsError, match="not a regular file"):
        load_model(tmp_path / "pipe.pt")


def test_a_bare_name_needs_weights_or_random_init(image: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", "--from", "resnet8", str(image)]) == 1
    err = capsys.readouterr().err
    assert "resnet8 names an architecture without weights" in err and "--random-init" in err
    assert main(["predict", "--from", "resnet20", str(image)]) == 1  # its published tag is suggested
    assert "--pretrained cifar10_akamaster" in capsys.readouterr().err
    assert main(["eval", "resnet8", "--data", "digits"]) == 1
    assert "without weights" in capsys.readouterr().err
    assert main(["predict", "--from", "resnet8", str(image), "--random-init"]) == 0
    tagged = resolve_source("resnet20:cifar10_akamaster")  # a name with its weights tag
    assert (tagged.kind, tagged.name, tagged.weights) == ("name", "resnet20", "cifar10_akamaster")
    with pytest.raises(ConfigError, match="names its weights tag already"):
        resolve_source("resnet20:cifar10_akamaster", pretrained="tv_in1k")
    with pytest.raises(ConfigError, match="without weights"):
        load_model("resnet8")
    assert isinstance(load_model("resnet8", random_init=True), resnetlab.ResNet)


def test_missing_data_is_named(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv in (["eval", str(model_dir)], ["study", "lesion", "--from", str(model_dir)],
                 ["study", "responses", "--from", str(model_dir)]):  # fmt: skip
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "needs --data" in err and "mean/std" not in err, argv
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")  # a truncated model folder: one line, not a traceback
    assert main(["eval", str(broken)]) == 1
    assert "not valid JSON" in capsys.readouterr().err


def test_similar_opens_only_the_model_named_on_the_command_line(model_dir: Path, tmp_path: Path, image: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    index = tmp_path / "emb.npy"
    assert main(["features", "--from", str(model_dir), str(image), "--out", str(index), "--json"]) == 0
    marker = tmp_path / "PWNED"
    evil = _evil_program(tmp_path, marker, sidecar_format="exported-program")
    meta = json.loads(index.with_suffix(".json").read_text())
    index.with_suffix(".json").write_text(json.dumps({**meta, "source": str(evil)}))  # a doctored index
    capsys.readouterr()
    assert main(["similar", str(image), "--index", str(index), "--from", str(model_dir)]) == 1
    assert f"was made with {evil}" in capsys.readouterr().err
    assert not marker.exists()
    index.with_suffix(".json").write_text(json.dumps({**meta, "source": "resnet8", "pretrained": "x"}))
    assert main(["similar", str(image), "--index", str(index), "--from", "resnet8", "--random-init"]) == 1
    assert "was made with resnet8 --pretrained x" in capsys.readouterr().err  # the weights must match too


def test_finetune_from_a_run_keeps_its_architecture_and_input_size(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    source = tmp_path / "source"
    resnetlab.save_pretrained(resnetlab.create_model("resnet8", num_classes=3), source)  # a 32-px CIFAR net
    data = write_colour_folder(tmp_path / "colours", {"train": 4, "val": 2}, noise=100, boost=150, size=40)
    assert main(["finetune", "--from", str(source), "--data", str(data), "--max-iters", "1", "--batch-size", "4",
                 "--run-dir", str(tmp_path / "runs" / "ft"), "--json"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    saved = json.loads((Path(summary["model_dir"]) / "config.json").read_text())
    assert saved["architecture"] == "resnet8" and saved["trained_with"]["model"] == "resnet8"
    assert saved["config"]["input_size"] == [3, 32, 32]  # the source's 32 px, not the recipe's 224


def test_a_default_run_folder_is_named_after_the_source_architecture(tmp_path: Path, monkeypatch) -> None:
    from resnetlab.train.config import load_recipe
    from resnetlab.transfer import finetune

    source = tmp_path / "source"
    resnetlab.save_pretrained(resnetlab.create_model("resnet8", num_classes=3), source)
    data = write_colour_folder(tmp_path / "colours", {"train": 4}, noise=100, boost=150)
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe("finetune", data=str(data), pretrained=str(source), max_iters=1, batch_size=4, progress=False)
    result = finetune(cfg)
    assert "-resnet8-" in result.run_dir.name and "resnet18" not in result.run_dir.name


def test_train_picks_a_model_for_photos_and_says_why(tmp_path: Path, monkeypatch,
                                                     capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    assert model_for_image_size(16)[0] == "resnet20" and model_for_image_size(224)[0] == "resnet18"
    monkeypatch.setattr("resnetlab.train.engine.train", lambda cfg, **kw: (_ for _ in ()).throw(ConfigError(cfg.model)))
    photos = write_colour_folder(tmp_path / "photos", {"train": 2}, noise=100, boost=150, size=96)
    assert main(["train", "--data", str(photos)]) == 1
    err = capsys.readouterr().err
    assert "training resnet18" in err and "224 px" in err and err.rstrip().endswith("error: resnet18")
    small = write_colour_folder(tmp_path / "small", {"train": 2}, noise=100, boost=150, size=16)
    assert main(["train", "--data", str(small)]) == 1
    assert capsys.readouterr().err.rstrip().endswith("error: resnet20")
    assert main(["train", "--data", str(small), "--model", "resnet8"]) == 1  # a named model is kept, silently
    assert capsys.readouterr().err.strip() == "resnetlab: error: resnet8"


def test_an_unknown_weights_file_warns_which_defaults_were_assumed(model_dir: Path, tmp_path: Path) -> None:
    torch.save(resnetlab.from_pretrained(model_dir).state_dict(), tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="name it: --from resnet50 --pretrained"):
        load_model(tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="assumed resnet8's defaults"):
        load_model("resnet8", pretrained=str(tmp_path / "w.pth"), num_classes=4)
    assert resolve_source(tmp_path / "w.pth", model="resnet8").kind == "weights"


@pytest.mark.shared
def test_a_published_file_by_path_brings_its_metadata(shared_file, image: Path,
                                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    path = shared_file("weights/cifar10-akamaster/resnet20-12fca82f.th")
    source = resolve_source(path)
    assert (source.kind, source.name, source.weights) == ("published", "resnet20", "cifar10_akamaster")
    predictor = Predictor.load(path)
    assert tuple(predictor.labels) == CIFAR10_CLASSES
    assert predictor.model.config.mean == (0.485, 0.456, 0.406) and predictor.model.config.std == (0.229, 0.224, 0.225)
    assert main(["predict", "--from", str(path), str(image)]) == 0
    assert capsys.readouterr().out.split(": ")[1].split()[0] in CIFAR10_CLASSES


@pytest.mark.shared
def test_the_default_tag_is_named(shared_file, image: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RESNETLAB_WEIGHTS_PATH", str(shared_file("weights/cifar10-akamaster")))
    with pytest.warns(UserWarning, match="resnet20: using its default weights 'cifar10_akamaster'"):
        assert main(["predict", "--from", "resnet20", "--pretrained", "default", str(image)]) == 0


@pytest.mark.shared
@pytest.mark.slow
def test_eval_of_a_published_file_by_path_scores_81_03(shared_file, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """By path, with nothing else said: the file's own preprocessing (ImageNet mean/std), so 81.03% as the
    original implementation scores on the JPEG test set (with CIFAR's own mean/std it was 80.73%)."""
    path = shared_file("weights/cifar10-akamaster/resnet20-12fca82f.th")
    data = shared_file("data/cifar10-jpeg.tar.xz")
    argv = ["eval", str(path), "--data", str(data), "--out", str(tmp_path), "--num-workers", "0", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["top1"] - 81.03) <= 0.1 and list(report["per_class"]) == list(CIFAR10_CLASSES)
