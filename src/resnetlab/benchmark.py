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
import resource
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab import backends as paths
from resnetlab.errors import ConfigError
from resnetlab.models import create_model

#: Benchmark-only ways to run PyTorch, then the inference paths of ``resnetlab.backends``, and ``best``.
BENCH_ONLY = ("compile", "torchscript")
BACKENDS = ("eager", *BENCH_ONLY, *(name for name in paths.BACKENDS if name != "eager"), "best")
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

            quantize_onnx_int8(path, path.with_name("int8.onnx"), _latency_calibration(example))
            path = path.with_name("int8.onnx")
        options = dict(threads=threads, optimization=optimization, device=example.device.type, spin=False)
        forward = onnx_session(path, **options)  # type: ignore[arg-type]
        twin = onnx_session(path, arena=False, **options)  # type: ignore[arg-type]
        return Contestant(label, forward, path.stat().st_size / 2**20, twin)  # sessions hold the model: file may go


def _latency_calibration(example: torch.Tensor) -> torch.Tensor:
    """Stand-in calibration images for the int8 paths, shaped like ``example``: the scales (hence accuracy)
    differ with real images, the int8 graph and its speed do not. A benchmark times random weights anyway."""
    return torch.randn(32, *example.shape[1:], generator=torch.Generator().manual_seed(0))


def _contestant(label: str, model: nn.Module, backend: str, example: torch.Tensor, *, train: bool, fold_bn: bool,
                dtype: torch.dtype, threads: int, quantize: str | None = None,
                ort_optimization: str = "all") -> Contestant:  # fmt: skip
    autocast = torch.autocast(example.device.type, dtype=dtype, enabled=dtype != torch.float32)
    weights = _weights_mb(model)  # before freezing (a frozen TorchScript module has no parameters left)
    if not train and backend in paths.BACKENDS and backend not in ("eager", "onnxruntime"):
        calibration = _latency_calibration(example) if paths.BACKENDS[backend].calibrated else None
        return Contestant(label, paths.build(backend, model.eval(), threads=threads, calibration=calibration), weights)
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


def _plain_loop(model: nn.Module, example: torch.Tensor, *, dtype: torch.dtype, compiled: bool) -> Contestant:
    """The yardstick for the engine: the shortest correct PyTorch training step of the same net (forward
    under autocast, cross-entropy, backward, SGD with momentum and weight decay), nothing else."""
    model.train()
    net = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    targets = torch.randint(0, 10, (example.shape[0],), generator=torch.Generator().manual_seed(0))

    def step(x: torch.Tensor) -> None:
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = nn.functional.cross_entropy(net(x).float(), targets.to(x.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return Contestant("plain_loop", step, _weights_mb(model))


def _engine_runs(name: str, example: torch.Tensor, *, data: str | None, dtype: str, channels_last: bool,
                 compiled: bool, folder: Path) -> list[Contestant]:  # fmt: skip
    """The training engine's own step (``TrainRun.step_on``: autocast, loss check, scaler, scheduler, running
    metrics, callbacks), once on the fixed batch and once fed by its data pipeline (``TrainBatches``: the
    device-resident, augmenting batches of an in-memory dataset, or the DataLoader of a folder), so the
    cost of the pipeline shows apart. ``data``: a dataset to feed it (default: random uint8 images of the
    model's size in memory, augmented as CIFAR is)."""
    from resnetlab.data import DataBundle, TensorImageDataset, build_data
    from resnetlab.train import TrainConfig
    from resnetlab.train.engine import TrainHooks, TrainRun
    from resnetlab.train.rundir import RunDir

    batch, channels, size = example.shape[0], example.shape[1], example.shape[-1]
    if data is None:
        images = torch.randint(0, 256, (max(4 * batch, 512), channels, size, size), dtype=torch.uint8)
        classes = [str(i) for i in range(10)]
        train = TensorImageDataset(images, torch.arange(len(images)) % 10, classes)
        bundle = DataBundle("random-uint8", train, None, None, classes, channels, size, (0.5,) * channels,
                            (0.25,) * channels, augment="cifar")  # fmt: skip
    else:
        bundle = build_data(data, augment="auto", image_size=size)
    cfg = TrainConfig(model=name, data=data, batch_size=batch, epochs=1000, lr=0.1, warmup_iters=0,
                      amp="off" if dtype == "float32" else "bf16", channels_last=channels_last, compile=compiled,
                      device=example.device.type, progress=False, tensorboard=False, run_dir=str(folder))  # fmt: skip
    run = TrainRun(cfg, RunDir(folder), state=None, callbacks=[], bundle=bundle, model=None, hooks=TrainHooks())
    run.enter_train_mode()
    targets = torch.randint(0, bundle.num_classes, (batch,), generator=torch.Generator().manual_seed(0))

    def fixed(x: torch.Tensor) -> None:
        run.step_on([(x, targets.to(x.device))])

    def batches() -> Any:
        epoch = 0
        while True:
            yield from run.batches.epoch(epoch, 0)
            epoch += 1

    stream = batches()

    def with_data(_: torch.Tensor) -> None:
        run.step_on([next(stream)])

    weights = _weights_mb(run.raw_model)
    return [Contestant("resnetlab", fixed, weights), Contestant("resnetlab_with_data", with_data, weights)]


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
    if backend in paths.BACKENDS and (why := paths.BACKENDS[backend].missing()):
        raise ConfigError(f"backend {backend} {why}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {tuple(DTYPES)}")
    if train and backend not in ("eager", "compile"):
        raise ConfigError("--train supports the eager and compile backends")
    if train and (fold_bn or quantize):
        raise ConfigError("--fold-bn and --quantize are inference options; drop them with --train")
    if quantize not in (None, "int8") or (quantize and backend != "onnxruntime"):
        raise ConfigError("--quantize int8 runs on the onnxruntime backend")
    if dtype != "float32" and backend not in ("eager", "compile"):
        raise ConfigError(f"--dtype {dtype} (autocast) applies to the eager and compile backends")
    if fold_bn and backend not in ("eager", *BENCH_ONLY, "onnxruntime"):
        raise ConfigError(f"the {backend} backend folds BatchNorm itself; drop --fold-bn")
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
    data: str | None = None,
) -> dict[str, Any]:
    """Measure ``name`` on ``backend``; also torchvision's ``name`` (eager, and on ``backend``) when it
    exists and ``compare``.

    ``dtype="bfloat16"`` runs every contestant under autocast (the same numerics class for all);
    ``channels_last`` puts every PyTorch contestant and the input in that memory format. ``fold_bn`` and
    ``quantize`` (int8, ONNX Runtime) apply to resnetlab's model only: they are what is being measured;
    with ``quantize``, the same model in fp32 is a yardstick too (``resnetlab_fp32``).

    ``train``: ``resnetlab`` is the training engine's own step (``TrainRun.step_on``) on a fixed batch,
    ``resnetlab_with_data`` the same step fed by the engine's data pipeline (``data``, default random images
    in memory), and ``plain_loop`` the shortest PyTorch loop of the same net: ``engine_vs_plain_loop`` is the
    engine's speed as a fraction of the loop's. ``backend="compile"`` compiles the engine and the loop.
    """
    dev = torch.device(device)
    if data is not None and not train:
        raise ConfigError("--data feeds the training engine's pipeline: use it with --train")
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
    choice = None
    if backend == "best":  # measure the candidates, then time the winner against the yardsticks
        choice = paths.choose(model.eval(), batch=batch, threads=threads, use_cache=False, verify=False,
                              calibration=_latency_calibration(x.cpu()))  # fmt: skip
        backend = choice.backend
    scratch = tempfile.TemporaryDirectory(prefix="resnetlab-bench-")
    if train:  # the engine's step, with and without its data pipeline, against a plain loop of the same net
        contestants = _engine_runs(name, x, data=data, dtype=dtype, channels_last=channels_last,
                                   compiled=backend == "compile", folder=Path(scratch.name) / "run")  # fmt: skip
        if compare:
            plain = create_model(name, num_classes=10).to(dev, memory_format=memory_format)
            contestants.append(_plain_loop(plain, x, dtype=DTYPES[dtype], compiled=backend == "compile"))
    else:
        contestants = [_contestant("resnetlab", model, backend, x, fold_bn=fold_bn, quantize=quantize,
                                   ort_optimization=ort_optimization, **options)]  # fmt: skip
    if quantize and compare:  # int8 against the same model in fp32, in the same run
        contestants.append(_contestant("resnetlab_fp32", model, backend, x, fold_bn=fold_bn,
                                       ort_optimization=ort_optimization, **options))  # fmt: skip
    import torchvision

    if compare and name in torchvision.models.list_models(module=torchvision.models):
        # On the paths of ``resnetlab.backends``, the yardstick is torchvision's model in ONNX Runtime fp32.
        same = backend if backend in ("eager", *BENCH_ONLY, "onnxruntime") else "onnxruntime"
        for tv_backend in dict.fromkeys(("eager", same)):
            reference = torchvision.models.get_model(name).to(dev, memory_format=memory_format)
            contestants.append(_contestant(f"torchvision_{tv_backend}", reference, tv_backend, x, fold_bn=False,
                                           ort_optimization=ort_optimization, **options))  # fmt: skip
    try:
        times = paths.time_interleaved([c.run for c in contestants], x, warmup, iters)
    finally:
        scratch.cleanup()
    result: dict[str, Any] = {
        "model": name, "backend": "best" if choice else backend, "path": backend,
        "mode": "train" if train else "inference", "batch": batch,
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
        if contestant.label == "resnetlab_with_data":  # the same engine, reported below against the loop
            continue
        against = "torchvision" if contestant.label == "torchvision_eager" else contestant.label
        result[f"speedup_vs_{against}"] = result[contestant.label]["p50_ms"] / ours
    if train and "plain_loop" in result:  # the engine fed by its data pipeline, against the plain loop
        result["with_data_vs_plain_loop"] = result["plain_loop"]["p50_ms"] / result["resnetlab_with_data"]["p50_ms"]
    if choice:
        result["choice"] = {"backend": choice.backend, "reason": choice.reason, "candidates": choice.measured}
    result["torch"] = torch.__version__
    return result
