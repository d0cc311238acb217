"""``benchmark``: throughput, latency percentiles and memory of a model, next to torchvision's.

The yardsticks are torchvision's model of the same name, run eagerly and, when the backend is not
eager, also on that same backend (torch.compile, TorchScript, ONNX Runtime), in the same process with
the same batch, input size, threads, dtype and memory format. Their iterations are interleaved with
ours, so the printed ratios are like-for-like on whatever machine this is, even a busy one.

Memory is measured per contestant, in a pass of its own after the warm-up: one call, its peak reset
before it. On CUDA, the peak allocated memory during the call above what was allocated before it
(activations and workspace). On CPU, the rise of the process's peak resident set (``VmHWM``, reset via
``/proc/self/clear_refs``) over its resident set before the call, after freed memory was handed back
to the OS; it sees every allocator (PyTorch's and ONNX Runtime's). Weights are reported apart
(``weights_mb``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models import create_model

BACKENDS = ("eager", "compile", "torchscript", "onnxruntime")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Contestant:
    """One thing being timed: a label (``resnetlab``, ``torchvision_eager``, ...), its step and its weights."""

    label: str
    run: Callable[[torch.Tensor], Any]
    weights_mb: float
    memory_run: Callable[[torch.Tensor], Any] | None = None  # the same computation, for the memory pass


def _weights_mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20


def _onnxruntime(label: str, model: nn.Module, example: torch.Tensor, *, threads: int, quantize: str | None,
                 optimization: str) -> Contestant:  # fmt: skip
    """Export to a temporary ONNX file (int8-quantized if asked), load it in ONNX Runtime, delete the file.

    Timed: a session with ONNX Runtime's defaults, except that idle threads do not spin (they would slow
    the contestant that runs next). Memory: a twin session without the memory arena, so that what one
    run needs shows in the process's resident set instead of hiding in the arena grown during warm-up.
    """
    from resnetlab.export.artifacts import onnx_export, onnx_session

    with tempfile.TemporaryDirectory(prefix="resnetlab-bench-") as folder:
        path = Path(folder) / "model.onnx"
        onnx_export(model, example[:2].float().cpu().contiguous(), path)
        if quantize:
            from resnetlab.export.quantize import quantize_onnx_int8

            # Latency only: the scales differ with real calibration images, the int8 graph does not.
            calibration = torch.randn(32, *example.shape[1:], generator=torch.Generator().manual_seed(0))
            quantize_onnx_int8(path, path.with_name("int8.onnx"), calibration)
            path = path.with_name("int8.onnx")
        options = dict(threads=threads, optimization=optimization, device=example.device.type, spin=False)
        forward = onnx_session(path, **options)  # type: ignore[arg-type]
        twin = onnx_session(path, arena=False, **options)  # type: ignore[arg-type]
        return Contestant(label, forward, path.stat().st_size / 2**20, twin)  # sessions hold the model: file may go


def _contestant(label: str, model: nn.Module, backend: str, example: torch.Tensor, *, train: bool, fold_bn: bool,
                dtype: torch.dtype, threads: int, quantize: str | None = None,
                ort_optimization: str = "all") -> Contestant:  # fmt: skip
    autocast = torch.autocast(example.device.type, dtype=dtype, enabled=dtype != torch.float32)
    weights = _weights_mb(model)  # before freezing (a frozen TorchScript module has no parameters left)
    if train:
        model.train()
        net = torch.compile(model) if backend == "compile" else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        targets = torch.zeros(example.shape[0], dtype=torch.long, device=example.device)

        def step(x: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = nn.functional.cross_entropy(net(x), targets)
            loss.backward()
            optimizer.step()

        return Contestant(label, step, weights)
    model.eval()
    if fold_bn:
        from resnetlab.export import fold_batchnorm

        model, _ = fold_batchnorm(model)  # type: ignore[arg-type]
    if backend == "onnxruntime":
        return _onnxruntime(label, model, example, threads=threads, quantize=quantize, optimization=ort_optimization)
    if backend == "torchscript":
        with torch.no_grad():
            model = torch.jit.freeze(torch.jit.trace(model, example))
    elif backend == "compile":
        model = torch.compile(model)

    def infer(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast:
            return model(x)

    return Contestant(label, infer, weights)


def _time(runs: list[Callable[[torch.Tensor], Any]], x: torch.Tensor, warmup: int, iters: int) -> list[list[float]]:
    """Time each runner ``iters`` times, interleaved so that a busy machine slows every contestant alike and
    their ratio stays fair. Each round runs them in a fresh (seeded) random order: a runtime's worker threads
    may keep spinning for a while after it returns (OpenMP does), and whoever always came next would pay."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for run in runs:
        for _ in range(warmup):
            run(x)
    sync()
    times: list[list[float]] = [[] for _ in runs]
    order, shuffle = list(range(len(runs))), random.Random(0).shuffle
    for _ in range(iters):
        shuffle(order)
        for i in order:
            start = time.perf_counter()
            runs[i](x)
            sync()
            times[i].append(time.perf_counter() - start)
    return times


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _memory_mb(run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> float | None:
    """Working memory of one call (see the module docstring); None where the OS cannot tell."""
    if x.is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed memory resident otherwise
    try:
        before = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except (OSError, KeyError):
        return None
    run(x)
    return max(0, _status_kb("VmHWM") - before) / 1024


def _stats(times: list[float], batch: int) -> dict[str, float]:
    ordered = sorted(times)

    def pct(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"mean_ms": 1000 * statistics.fmean(times), "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
            "images_per_second": batch / statistics.median(times)}  # fmt: skip


def _check(backend: str, *, train: bool, device: torch.device, dtype: str, quantize: str | None, fold_bn: bool,
           ort_optimization: str) -> None:  # fmt: skip
    from resnetlab.export.artifacts import ORT_OPTIMIZATION

    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {tuple(DTYPES)}")
    if train and backend not in ("eager", "compile"):
        raise ConfigError("--train supports the eager and compile backends")
    if train and (fold_bn or quantize):
        raise ConfigError("--fold-bn and --quantize are inference options; drop them with --train")
    if quantize not in (None, "int8") or (quantize and backend != "onnxruntime"):
        raise ConfigError("--quantize int8 runs on the onnxruntime backend")
    if dtype != "float32" and backend in ("onnxruntime", "torchscript"):
        raise ConfigError(f"--dtype {dtype} (autocast) applies to the eager and compile backends")
    if ort_optimization not in ORT_OPTIMIZATION:
        raise ConfigError(f"unknown ONNX Runtime optimisation level {ort_optimization!r}; choose one of "
                          f"{ORT_OPTIMIZATION}")  # fmt: skip
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but PyTorch sees no CUDA device here")


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
    dtype: str = "float32",
    quantize: str | None = None,
    ort_optimization: str = "all",
    threads: int | None = None,
    warmup: int = 3,
    iters: int = 10,
    compare: bool = True,
) -> dict[str, Any]:
    """Measure ``name`` on ``backend``; also torchvision's ``name`` (eager, and on ``backend``) when it
    exists and ``compare``.

    ``dtype="bfloat16"`` runs every contestant under autocast (the same numerics class for all);
    ``channels_last`` puts every PyTorch contestant and the input in that memory format. ``fold_bn`` and
    ``quantize`` (int8, ONNX Runtime) apply to resnetlab's model only: they are what is being measured;
    with ``quantize``, the same model in fp32 is a yardstick too (``resnetlab_fp32``).
    """
    dev = torch.device(device)
    _check(
        backend,
        train=train,
        device=dev,
        dtype=dtype,
        quantize=quantize,
        fold_bn=fold_bn,
        ort_optimization=ort_optimization,
    )
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(name).to(dev, memory_format=memory_format)
    size = image_size or model.config.input_size[-1]
    x = torch.randn(batch, model.config.in_chans, size, size, device=dev).contiguous(memory_format=memory_format)
    options = dict(train=train, dtype=DTYPES[dtype], threads=threads)
    contestants = [_contestant("resnetlab", model, backend, x, fold_bn=fold_bn, quantize=quantize,
                               ort_optimization=ort_optimization, **options)]  # fmt: skip
    if quantize and compare:  # int8 against the same model in fp32, in the same run
        contestants.append(_contestant("resnetlab_fp32", model, backend, x, fold_bn=fold_bn,
                                       ort_optimization=ort_optimization, **options))  # fmt: skip
    import torchvision

    if compare and name in torchvision.models.list_models(module=torchvision.models):
        for tv_backend in dict.fromkeys(("eager", backend)):
            reference = torchvision.models.get_model(name).to(dev, memory_format=memory_format)
            contestants.append(_contestant(f"torchvision_{tv_backend}", reference, tv_backend, x, fold_bn=False,
                                           ort_optimization=ort_optimization, **options))  # fmt: skip
    times = _time([c.run for c in contestants], x, warmup, iters)
    result: dict[str, Any] = {
        "model": name, "backend": backend, "mode": "train" if train else "inference", "batch": batch,
        "image_size": size, "device": str(dev), "threads": threads, "dtype": dtype, "channels_last": channels_last,
        "fold_bn": fold_bn, "quantize": quantize, "ort_optimization": ort_optimization if backend == "onnxruntime"
        else None, "iters": iters,
    }  # fmt: skip
    result["process_peak_memory_mb"] = (  # read before the memory pass resets the peaks
        torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # fmt: skip
    for contestant, measured in zip(contestants, times):
        memory = _memory_mb(contestant.memory_run or contestant.run, x)
        result[contestant.label] = {**_stats(measured, batch), "memory_mb": memory, "weights_mb": contestant.weights_mb}
    ours = result["resnetlab"]["p50_ms"]
    for contestant in contestants[1:]:
        against = "torchvision" if contestant.label == "torchvision_eager" else contestant.label
        result[f"speedup_vs_{against}"] = result[contestant.label]["p50_ms"] / ours
    result["torch"] = torch.__version__
    return result
