"""resnetlab benchmark: the JSON structure, every backend, the torchvision yardsticks, memory, guards."""

from __future__ import annotations

import json
import tempfile

import pytest

from resnetlab.benchmark import benchmark
from resnetlab.cli.main import build_parser, main
from resnetlab.errors import ConfigError


@pytest.mark.parametrize(
    "backend",
    ["eager", pytest.param("torchscript", marks=pytest.mark.slow), pytest.param("onnxruntime", marks=pytest.mark.slow)],
)
def test_inference_backends_against_torchvision(backend: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the ONNX backend's export goes
    r = benchmark("resnet18", batch=2, image_size=32, backend=backend, fold_bn=backend != "eager", warmup=1, iters=2)
    assert r["resnetlab"]["images_per_second"] > 0 and r["resnetlab"]["p50_ms"] <= r["resnetlab"]["p99_ms"]
    assert r["torchvision_eager"]["p50_ms"] > 0 and r["speedup_vs_torchvision"] > 0
    if backend != "eager":  # torchvision on the same backend is the second yardstick
        assert r[f"torchvision_{backend}"]["p50_ms"] > 0 and r[f"speedup_vs_torchvision_{backend}"] > 0
    for label in ("resnetlab", "torchvision_eager"):
        assert r[label]["memory_mb"] is not None and r[label]["memory_mb"] >= 0
        assert r[label]["weights_mb"] > 10  # resnet18: 11.7 M fp32 parameters, 44.6 MB
    assert list(tmp_path.iterdir()) == []  # the temporary export is deleted


def test_memory_is_per_contestant_and_grows_with_the_batch() -> None:
    small, large = (benchmark("resnet8", batch=b, warmup=1, iters=1, compare=False) for b in (1, 128))
    assert "torchvision_eager" not in small
    # a 16x32x32 fp32 feature map is 64 kB per image; several are alive at once
    assert large["resnetlab"]["memory_mb"] > small["resnetlab"]["memory_mb"] + 8


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
def test_int8_bfloat16_and_channels_last_options() -> None:
    q = benchmark("resnet8", batch=2, backend="onnxruntime", quantize="int8", warmup=1, iters=1)
    assert q["quantize"] == "int8" and q["resnetlab"]["weights_mb"] < 0.15  # int8 weights: ~78k parameters
    assert q["resnetlab_fp32"]["weights_mb"] > 0.25 and q["speedup_vs_resnetlab_fp32"] > 0  # fp32 in the same run
    b = benchmark("resnet8", batch=2, dtype="bfloat16", channels_last=True, warmup=1, iters=1, train=True)
    assert b["dtype"] == "bfloat16" and b["channels_last"] and b["resnetlab"]["p50_ms"] > 0


@pytest.mark.slow
def test_int8_paths_are_timed_alone_and_as_best_candidates() -> None:
    """A benchmark times random weights: the int8 paths get stand-in calibration images (latency only)."""
    r = benchmark("resnet8", batch=2, backend="openvino-int8" if _has("openvino") else "onnxruntime-int8",
                  warmup=1, iters=1, compare=False)  # fmt: skip
    assert r["resnetlab"]["p50_ms"] > 0
    best = benchmark("resnet8", batch=2, backend="best", warmup=1, iters=1, compare=False)
    assert best["choice"]["candidates"]["onnxruntime-int8"]["p50_ms"] > 0, best["choice"]


def test_training_step_and_cli_json(capsys) -> None:
    assert main(["benchmark", "--model", "resnet8", "--batch", "4", "--train", "--iters", "2", "--warmup", "1",
                 "--json"]) == 0  # fmt: skip
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "train" and "torchvision_eager" not in r  # torchvision has no resnet8
    assert r["resnetlab"]["memory_mb"] is not None
    # the engine's step, with and without its data pipeline, and the plain-loop yardstick, in one run
    for label in ("resnetlab", "resnetlab_with_data", "plain_loop"):
        assert r[label]["images_per_second"] > 0
    assert r["speedup_vs_plain_loop"] > 0 and r["with_data_vs_plain_loop"] > 0


def test_training_benchmark_feeds_the_engine_a_named_dataset(tmp_path, capsys) -> None:
    from colour_folders import write_colour_folder

    data = write_colour_folder(tmp_path / "colours", {"train": 8, "test": 2}, noise=100, boost=100)
    r = benchmark("resnet8", batch=4, image_size=16, train=True, data=str(data), warmup=1, iters=1)
    assert r["resnetlab_with_data"]["images_per_second"] > 0
    with pytest.raises(ConfigError, match="--train"):
        benchmark("resnet8", batch=2, data=str(data), iters=1)


def test_compile_flag_is_the_compile_backend() -> None:
    args = build_parser().parse_args(["benchmark", "--compile"])
    assert args.backend == "compile"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(train=True, backend="onnxruntime"), "train"),
        (dict(train=True, fold_bn=True), "inference options"),
        (dict(quantize="int8"), "onnxruntime backend"),
        (dict(backend="onnxruntime", dtype="bfloat16"), "eager and compile"),
        (dict(dtype="float16"), "unknown dtype"),
        (dict(backend="onnxruntime", ort_optimization="max"), "optimisation level"),
    ],
)
def test_bad_combinations_are_clear_errors(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        benchmark("resnet8", batch=1, warmup=0, iters=1, compare=False, **options)


def test_onnxruntime_on_cuda_needs_its_cuda_provider(tmp_path) -> None:
    import onnxruntime as ort
    import torch

    from resnetlab.export.artifacts import onnx_export, onnx_session

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has a CUDA provider: nothing to refuse")
    path = tmp_path / "m.onnx"
    onnx_export(torch.nn.Conv2d(3, 2, 1), torch.zeros(2, 3, 4, 4), path)
    with pytest.raises(ConfigError, match="onnxruntime-gpu"):
        onnx_session(path, device="cuda")


@pytest.mark.slow
def test_compile_backend_inference() -> None:
    r = benchmark("resnet8", batch=2, backend="compile", warmup=1, iters=1, compare=False)
    assert r["backend"] == "compile" and r["resnetlab"]["p50_ms"] > 0
