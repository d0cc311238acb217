"""``benchmark``: throughput, latency percentiles and memory of a model, next to torchvision's.

The yardstick is torchvision's model of the same name, run eagerly in the same process with the same
batch, size and threads, its iterations interleaved with ours, so the printed ratio is a like-for-like
comparison on whatever machine this is, even a busy one.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models import create_model

BACKENDS = ("eager", "compile", "torchscript", "onnxruntime")


def _runner(model: nn.Module, backend: str, example: torch.Tensor, *, fold_bn: bool, channels_last: bool,
            train: bool, threads: int) -> Callable[[torch.Tensor], Any]:  # fmt: skip
    if train:
        if backend not in ("eager", "compile"):
            raise ConfigError("--train supports the eager and compile backends")
        model.train()
        net = torch.compile(model) if backend == "compile" else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        targets = torch.zeros(example.shape[0], dtype=torch.long, device=example.device)

        def step(x: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), targets).backward()
            optimizer.step()

        return step
    model.eval()
    if fold_bn:
        from resnetlab.export import fold_batchnorm

        model, _ = fold_batchnorm(model)  # type: ignore[arg-type]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if backend == "onnxruntime":
        from resnetlab.export import export_model, load_export

        folder = Path(tempfile.mkdtemp(prefix="resnetlab-bench-"))
        path = export_model(model, folder / "model.onnx", "onnx", image_size=example.shape[-1])  # type: ignore[arg-type]
        forward, _, _ = load_export(path, threads=threads)
        return forward
    if backend == "torchscript":
        model = torch.jit.freeze(torch.jit.trace(model, example))
    elif backend == "compile":
        model = torch.compile(model)

    def infer(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return infer


def _time(runs: list[Callable[[torch.Tensor], Any]], x: torch.Tensor, warmup: int, iters: int) -> list[list[float]]:
    """Time each runner ``iters`` times, interleaved (A, B, A, B, ...) so that a busy machine slows every
    contestant alike and their ratio stays fair."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for run in runs:
        for _ in range(warmup):
            run(x)
    sync()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(iters):
        for run, bucket in zip(runs, times):
            start = time.perf_counter()
            run(x)
            sync()
            bucket.append(time.perf_counter() - start)
    return times


def _stats(times: list[float], batch: int) -> dict[str, float]:
    ordered = sorted(times)

    def pct(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"mean_ms": 1000 * statistics.fmean(times), "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
            "images_per_second": batch / statistics.median(times)}  # fmt: skip


def benchmark(
    name: str,
    *,
    batch: int = 16,
    image_size: int | None = None,
    backend: str = "eager",
    train: bool = False,
    device: str = "cpu",
    fold_bn: bool = False,
    channels_last: bool = False,
    threads: int | None = None,
    warmup: int = 3,
    iters: int = 10,
    compare: bool = True,
) -> dict[str, Any]:
    """Measure ``name`` with ``backend``; also torchvision's eager ``name`` when it exists and ``compare``."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    dev = torch.device(device)
    model = create_model(name).to(dev)
    size = image_size or model.config.input_size[-1]
    x = torch.randn(batch, model.config.in_chans, size, size, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = [_runner(model, backend, x, fold_bn=fold_bn, channels_last=channels_last, train=train, threads=threads)]
    import torchvision

    has_reference = compare and name in torchvision.models.list_models(module=torchvision.models)
    if has_reference:
        reference = torchvision.models.get_model(name).to(dev)
        runs.append(_runner(reference, "eager", x, fold_bn=False, channels_last=False, train=train, threads=threads))
    times = _time(runs, x, warmup, iters)
    ours = _stats(times[0], batch)
    result: dict[str, Any] = {
        "model": name,
        "backend": backend,
        "mode": "train" if train else "inference",
        "batch": batch,
        "image_size": size,
        "device": str(dev),
        "threads": threads,
        "fold_bn": fold_bn,
        "channels_last": channels_last,
        "iters": iters,
        "resnetlab": ours,
        "peak_memory_mb": (
            torch.cuda.max_memory_allocated() / 2**20
            if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
        "torch": torch.__version__,
    }
    if has_reference:
        result["torchvision_eager"] = _stats(times[1], batch)
        result["speedup_vs_torchvision"] = result["torchvision_eager"]["p50_ms"] / ours["p50_ms"]
    return result
