"""Each study at toy scale: its outputs exist and the sign of the robust effects is right."""

from __future__ import annotations

import json
import math

import pytest
import torch

import resnetlab
from resnetlab.cli.main import main
from resnetlab.studies import gradients_at_init, layer_response_stds, lesioned
from resnetlab.studies.lesion import path_gradient_magnitudes, single_lesions


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_gradients_vanish_without_norm_and_explode_with_bn_in_plain56_only(batch) -> None:
    no_norm = {n: gradients_at_init(n, batch, norm_layer="none") for n in ("plain56", "resnet56")}
    assert no_norm["plain56"][0] < 1e-3 * no_norm["resnet56"][0]  # the first layer gets almost nothing
    bn = {n: gradients_at_init(n, batch) for n in ("plain56", "resnet56")}
    plain_ratio, resnet_ratio = bn["plain56"][0] / bn["plain56"][-1], bn["resnet56"][0] / bn["resnet56"][-1]
    assert plain_ratio > 10 * resnet_ratio  # with BN the plain stack's early gradients blow up instead


def test_lesioning_hurts_a_resnet_less_than_a_plain_net(batch) -> None:
    """Trained briefly on a fixed batch, one deleted block costs a ResNet less than a plain net.

    GroupNorm: no running statistics, so a few steps of training give a meaningful eval-mode model."""
    x, y = batch
    results = {}
    for name in ("resnet20", "plain20"):
        torch.manual_seed(0)
        model = resnetlab.create_model(name, norm_layer="groupnorm")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(30):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            intact = torch.nn.functional.cross_entropy(model(x), y).item()
            rows = single_lesions(model, [(x, y)])
            losses = []
            for row in rows:
                if not math.isnan(row["accuracy"]) and not row["downsampling"]:
                    with lesioned(model, {row["block"]}):
                        losses.append(torch.nn.functional.cross_entropy(model(x), y).item())
        results[name] = sum(losses) / len(losses) - intact
    assert results["resnet20"] < results["plain20"]


def test_lesioned_context_restores_blocks() -> None:
    model = resnetlab.create_model("resnet20")
    with lesioned(model, {0, 4}):
        assert model.blocks()[0].lesioned and model.blocks()[4].lesioned
    assert not any(b.lesioned for b in model.blocks())


def test_path_gradients_cover_every_length(batch) -> None:
    model = resnetlab.create_model("resnet20")
    rows = path_gradient_magnitudes(model, batch, samples=1, seed=0)
    assert [r["length"] for r in rows] == list(range(10))
    assert sum(r["paths"] for r in rows) == 2**9
    assert sum(r["gradient_share"] for r in rows) == pytest.approx(1.0)
    assert all(b.use_shortcut and not b.lesioned for b in model.blocks())


def test_responses_one_per_3x3_layer(batch) -> None:
    model = resnetlab.create_model("resnet20").eval()
    stds = layer_response_stds(model, [batch])
    assert len(stds) == 18 and all(s > 0 for s in stds)


@pytest.mark.slow
def test_study_commands_write_their_outputs(tmp_path, capsys) -> None:
    common = ["--json"]
    assert main(["study", "gradients", "--depths", "8,14", "--subset", "128", "--train-steps", "4",
                 "--record-every", "2", "--out", str(tmp_path / "g"), *common]) == 0  # fmt: skip
    grads = json.loads(capsys.readouterr().out)
    assert set(grads["first_over_last_at_init"]) == {f"{f}{d}/{n}" for f in ("plain", "resnet") for d in (8, 14)
                                                      for n in ("batchnorm", "none")}  # fmt: skip
    for name in ("gradients.csv", "gradients_at_init.png", "gradients_training.png", "report.md"):
        assert (tmp_path / "g" / name).exists()

    assert main(["study", "degradation", "--depths", "8,14", "--max-iters", "6", "--eval-every", "3",
                 "--subset", "256", "--test-subset", "100", "--out", str(tmp_path / "d"), *common]) == 0  # fmt: skip
    deg = json.loads(capsys.readouterr().out)
    assert set(deg["final"]) == {"plain8", "plain14", "resnet8", "resnet14"}
    assert isinstance(deg["plain_deeper_trains_worse"], bool)
    assert (tmp_path / "d" / "degradation.png").exists() and (tmp_path / "d" / "curves.csv").exists()

    model_dir = tmp_path / "d" / "resnet14" / "model"
    plain_dir = tmp_path / "d" / "plain14" / "model"
    assert main(["study", "lesion", "--from", str(model_dir), "--plain", str(plain_dir), "--test-subset", "100",
                 "--samples", "2", "--path-samples", "1", "--out", str(tmp_path / "l"), *common]) == 0  # fmt: skip
    les = json.loads(capsys.readouterr().out)
    assert les["residual"]["intact"] >= 0 and "plain" in les and les["paths"]["blocks"] == 6
    assert (tmp_path / "l" / "lesion.png").exists()

    assert main(["study", "responses", "--from", str(model_dir), str(plain_dir), "--test-subset", "100",
                 "--out", str(tmp_path / "r"), *common]) == 0  # fmt: skip
    resp = json.loads(capsys.readouterr().out)
    assert len(resp["models"]) == 2 and (tmp_path / "r" / "responses.png").exists()
