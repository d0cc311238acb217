"""resnetlab benchmark: the JSON structure, every backend, and the torchvision yardstick."""

from __future__ import annotations

import json

import pytest

from resnetlab.benchmark import benchmark
from resnetlab.cli.main import main
from resnetlab.errors import ConfigError


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnxruntime"])
def test_inference_backends_against_torchvision(backend: str) -> None:
    r = benchmark("resnet18", batch=2, image_size=32, backend=backend, fold_bn=backend != "eager", warmup=1, iters=2)
    assert r["resnetlab"]["images_per_second"] > 0 and r["resnetlab"]["p50_ms"] <= r["resnetlab"]["p99_ms"]
    assert r["torchvision_eager"]["p50_ms"] > 0 and r["speedup_vs_torchvision"] > 0


def test_training_step_and_cli_json(capsys) -> None:
    assert main(["benchmark", "--model", "resnet8", "--batch", "4", "--train", "--iters", "2", "--warmup", "1",
                 "--json"]) == 0  # fmt: skip
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "train" and "torchvision_eager" not in r  # torchvision has no resnet8
    with pytest.raises(ConfigError, match="train"):
        benchmark("resnet8", train=True, backend="onnxruntime")
