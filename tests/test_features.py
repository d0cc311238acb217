"""Embeddings: hooks, pooled stages, files of any mode, bad files skipped, saved index, similar search."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resnetlab
from colour_folders import write_colour_folder
from resnetlab.cli.main import main
from resnetlab.errors import DataError, InputError
from resnetlab.inference import Predictor
from resnetlab.transfer.features import (
    Embeddings,
    capture_outputs,
    extract_features,
    nearest,
    pooled_features,
    probe_embeddings,
)

TINY = dict(widths=(4, 8, 16), stem_channels=4, input_size=(3, 16, 16), crop_pct=1.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    resnetlab.save_pretrained(resnetlab.create_model("resnet20", num_classes=3, **TINY), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images in awkward modes (L, RGBA, CMYK, 16-bit, EXIF-rotated), one corrupt file, one duplicate."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    rgb.save(root / "rgb.png")
    rgb.save(root / "rgb_copy.png")
    rgb.convert("L").save(root / "grey.png")
    rgb.convert("RGBA").save(root / "alpha.png")
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(root / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    rgb.save(root / "rotated.jpg", exif=exif)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def test_capture_outputs_records_named_modules_and_removes_its_hooks() -> None:
    model = resnetlab.create_model("resnet20", **TINY).eval()
    x = torch.rand(2, 3, 16, 16)
    with capture_outputs(model, ["layer2", "layer3.0.bn2"]) as outputs:
        model(x)
    assert outputs["layer2"].shape == (2, 8, 8, 8)
    assert outputs["layer3.0.bn2"].shape == (2, 16, 4, 4)  # a residual branch, before the addition
    # exactly what the module returned, although the block then adds its shortcut into it in place
    block = model.layer3[0]
    branch_input = model.layer2(model.layer1(model.forward_stem(x)))
    with torch.no_grad():
        expected = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(branch_input)))))
    torch.testing.assert_close(outputs["layer3.0.bn2"], expected)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(InputError, match="no module"), capture_outputs(model, ["layer9"]):
        pass


def test_pooled_features_of_the_last_stage_are_the_classifier_input() -> None:
    model = resnetlab.create_model("resnet20", **TINY).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        last = pooled_features(model, x)
        torch.testing.assert_close(model.fc(last), model(x))
        assert pooled_features(model, x, stage=1).shape == (2, 4)
        maps = resnetlab.create_model("resnet20", features_only=True, out_indices=(1, 2, 3), **TINY)(x)
    assert [m.shape[1] for m in maps] == [4, 8, 16]  # multi-scale maps of a features-only model


def test_every_mode_is_embedded_and_bad_files_are_reported(model_dir: Path, images: Path) -> None:
    files = sorted(images.iterdir())
    result = extract_features(Predictor.load(model_dir), files, batch_size=3)
    assert [Path(f).name for f, _ in result.failed] == ["broken.jpg"]
    assert len(result.files) == len(files) - 1 and result.vectors.shape == (len(files) - 1, 16)
    assert np.isfinite(result.vectors).all()
    by_name = dict(zip((Path(f).name for f in result.files), result.vectors))
    np.testing.assert_allclose(by_name["rgb.png"], by_name["rgb_copy.png"])


def test_embeddings_round_trip_and_nearest(tmp_path: Path) -> None:
    vectors = np.eye(3, dtype=np.float32) + 0.01
    saved = Embeddings(vectors, ["a.png", "b.png", "c.png"], {"stage": None}).save(tmp_path / "index.npy")
    loaded = Embeddings.load(saved)
    assert loaded.files == ["a.png", "b.png", "c.png"]
    assert json.loads(saved.with_suffix(".json").read_text())["dim"] == 3
    [[(best, score), _]] = nearest(loaded, vectors[1:2], k=2)
    assert best == "b.png" and score == pytest.approx(1.0)
    with pytest.raises(InputError, match="dims"):
        nearest(loaded, np.ones((1, 4), np.float32))


def test_cli_features_then_similar(model_dir: Path, images: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    out = tmp_path / "emb.npy"
    assert main(["features", "--from", str(model_dir), str(images), "--out", str(out), "--stage", "2",
                 "--json"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 7 and summary["dim"] == 8 and len(summary["skipped"]) == 1
    assert out.with_suffix(".csv").read_text().splitlines()[0] == "index,file"
    assert main(["similar", str(images / "rgb.png"), "--index", str(out), "--from", str(model_dir), "-k", "3",
                 "--json"]) == 0  # fmt: skip
    [result] = json.loads(capsys.readouterr().out)["results"]
    # the same pixels: a copy, and the RGBA version (opaque alpha is dropped by load_image)
    assert {Path(m["file"]).name for m in result["matches"]} == {"rgb.png", "rgb_copy.png", "alpha.png"}
    assert all(m["score"] == pytest.approx(1.0, abs=1e-5) for m in result["matches"])


def test_file_names_that_are_not_utf8_round_trip(tmp_path: Path) -> None:
    latin1 = os.fsdecode(b"caf\xe9.png")  # as Python lists a Latin-1 name: with a surrogate
    saved = Embeddings(np.ones((2, 3), np.float32), [latin1, "b.png"]).save(tmp_path / "emb.npy")
    assert Embeddings.load(saved).files == [latin1, "b.png"]


def test_save_keeps_dotted_names_and_load_finds_them(tmp_path: Path) -> None:
    embeddings = Embeddings(np.ones((2, 3), np.float32), ["a.png", "b.png"])
    saved = embeddings.save(tmp_path / "emb.v2")
    assert saved == tmp_path / "emb.v2.npy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.v2.csv", "emb.v2.json", "emb.v2.npy"]
    assert Embeddings.load(tmp_path / "emb.v2").files == ["a.png", "b.png"]
    assert Embeddings.load(saved).files == ["a.png", "b.png"]


def test_a_features_run_killed_between_its_renames_is_detected(model_dir: Path, images: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """A new .npy beside the old .csv used to make `similar` answer with the wrong file names, exit 0."""
    from resnetlab import io as io_module

    out = tmp_path / "emb.npy"
    Embeddings(np.ones((2, 8), np.float32), ["old-a.png", "old-b.png"]).save(out)
    real_replace = io_module.replace_with

    def killed_after_the_npy(tmp: Path, path: Path) -> None:
        real_replace(tmp, path)
        if path.suffix == ".npy":
            raise KeyboardInterrupt  # stands for the kill: the .csv and .json renames never happen

    monkeypatch.setattr(io_module, "replace_with", killed_after_the_npy)
    with pytest.raises(KeyboardInterrupt):
        Embeddings(np.zeros((2, 8), np.float32) + 2, ["new-a.png", "new-b.png"]).save(out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.csv", "emb.json", "emb.npy"]  # no leftovers
    with pytest.raises(DataError, match=r"emb\.npy, emb\.csv and emb\.json do not belong together"):
        Embeddings.load(out)
    assert main(["similar", str(images / "rgb.png"), "--index", str(out), "--from", str(model_dir)]) == 1
    assert "do not belong together" in capsys.readouterr().err


def _index(tmp_path: Path, model_dir: Path) -> Path:
    out = tmp_path / "emb.npy"
    meta = {"source": str(model_dir), "stage": None}
    return Embeddings(np.ones((2, 16), np.float32), ["a.png", "b.png"], meta).save(out)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-20]), "emb.npy is not a readable .npy file, truncated"),
        (lambda p: p.with_suffix(".json").write_text("{not json"), "emb.json is not valid JSON"),
        (lambda p: p.with_suffix(".csv").write_text("index,name\n0,a.png\n1,b.png\n"), "has no 'file' column"),
    ],
    ids=["truncated-npy", "bad-json", "csv-without-file"],
)
def test_similar_explains_a_damaged_index_in_one_line(model_dir: Path, images: Path, tmp_path: Path, spoil,
                                                      message: str, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    index = _index(tmp_path, model_dir)
    spoil(index)
    meta = json.loads(index.with_suffix(".json").read_text()) if "json" not in message else None
    if meta is not None:  # a damaged file whose hash was recorded again: the parser itself must explain it
        meta["content_sha256"] = None
        index.with_suffix(".json").write_text(json.dumps(meta))
    assert main(["similar", str(images / "rgb.png"), "--index", str(index), "--from", str(model_dir)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_similar_refuses_a_top_k_below_one(model_dir: Path, images: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    index = _index(tmp_path, model_dir)
    # the option's type refuses it now, before anything is loaded (argparse's usage error: exit 2)
    assert main(["similar", str(images / "rgb.png"), "--index", str(index), "--from", str(model_dir), "-k", "-1"]) == 2
    assert "argument -k/--top-k: must be a positive integer, got -1" in capsys.readouterr().err
    with pytest.raises(InputError, match="at least 1"):
        nearest(Embeddings.load(index), np.ones((1, 16), np.float32), k=0)


def test_parquet_without_pandas_is_a_clear_error(model_dir: Path, images: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as on a machine without the parquet extra
    out = tmp_path / "emb.parquet"
    assert main(["features", "--from", str(model_dir), str(images / "rgb.png"), "--out", str(out), "--json"]) == 1
    assert "pip install 'resnetlab[parquet]'" in json.loads(capsys.readouterr().out)["message"]
    assert not out.exists()


def test_features_of_an_exported_model_is_a_clear_error(model_dir: Path, images: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from resnetlab.export import export_model

    artifact = export_model(resnetlab.from_pretrained(model_dir), tmp_path / "model.pt", "torchscript")
    code = main(["features", "--from", str(artifact), str(images / "rgb.png"), "--out", str(tmp_path / "e"),
                 "--json"])  # fmt: skip
    assert code == 1
    assert "run or model folder it was exported from" in json.loads(capsys.readouterr().out)["message"]


def _labelled(rng: np.random.Generator, split: str, count: int) -> Embeddings:
    """Two classes around different centres in 8 dims, named like an ImageFolder (``split/class/i.png``)."""
    centres = {"ants": np.eye(8)[0] * 3, "bees": np.eye(8)[1] * 3}
    files, vectors = [], []
    for name, centre in centres.items():
        for i in range(count):
            files.append(f"{split}/{name}/{i}.png")
            vectors.append(centre + rng.normal(0, 1, 8))
    return Embeddings(np.array(vectors, np.float32), files)


def test_probe_embeddings_scores_separable_classes_high_and_shuffled_ones_near_chance() -> None:
    rng = np.random.default_rng(0)
    train, val = _labelled(rng, "train", 40), _labelled(rng, "val", 40)
    result = probe_embeddings(train, val, ks=(1, 5))
    assert result["classes"] == ["ants", "bees"] and result["largest_class"] == 50.0
    assert result["logistic_regression"] >= 95 and min(result["knn"].values()) >= 90
    assert min(result["retrieval"].values()) >= 85
    swapped = Embeddings(
        val.vectors, [f.replace("ants", "x").replace("bees", "ants").replace("x", "bees") for f in val.files]
    )  # every val label wrong: the probes must see it
    wrong = probe_embeddings(train, swapped, ks=(1, 5))
    assert wrong["logistic_regression"] <= 5 and max(wrong["knn"].values()) <= 10
    assert max(wrong["retrieval"].values()) <= 15
    with pytest.raises(DataError, match="do not occur in train"):
        probe_embeddings(train, Embeddings(val.vectors[:1], ["val/wasps/0.png"]))


def test_cli_probe_retrieval_matches_what_similar_returns(model_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    write_colour_folder(tmp_path, {"train": 6, "val": 4}, noise=100, boost=150)
    for split in ("train", "val"):
        assert main(["features", "--from", str(model_dir), str(tmp_path / split), "--out",
                     str(tmp_path / f"{split}.npy"), "--json"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["probe", "--train", str(tmp_path / "train.npy"), "--val", str(tmp_path / "val.npy"),
                 "-k", "1", "3", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["train"] == 12 and result["val"] == 8 and set(result["knn"]) == {"1", "3"}
    assert main(["similar", str(tmp_path / "val"), "--index", str(tmp_path / "train.npy"), "--from", str(model_dir),
                 "-k", "1", "--json"]) == 0  # fmt: skip
    found = json.loads(capsys.readouterr().out)["results"]
    same = [Path(r["query"]).parent.name == Path(r["matches"][0]["file"]).parent.name for r in found]
    assert result["retrieval"]["1"] == pytest.approx(100 * sum(same) / len(same))
