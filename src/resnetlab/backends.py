"""Inference backends: the ways a trained ResNet can run on this machine, and ``best``, which picks one.

``BACKENDS`` is the one table of candidates. Each entry builds, from the PyTorch model, a forward function
(float NCHW tensor -> float logits) for one runtime and number format. ``choose`` runs the ``best`` policy:

1. every candidate that is installed and **verified for the model's family** is built. A path is verified
   for a family when its accuracy check passed there (docs/results/deployment.md): ``cifar`` (CIFAR stem:
   the published ResNet-20 and ResNet-56 on the 10,000 JPEG test images, within 0.3 points of fp32) and
   ``imagenet`` (every other stem: a ResNet-50 on the ants/bees photos, logits cosine >= 0.999 and top-1
   agreement >= 99% with fp32);
2. each is checked against the fp32 model on a check batch (real images where the caller has them): logits
   cosine >= ``MIN_COSINE`` and top-1 agreement >= ``MIN_AGREEMENT``; one that fails is dropped, with why;
3. the survivors are timed, interleaved, at the caller's batch size; the fastest wins.

The choice is cached per model (architecture, config, weights) and machine (CPU, threads, library versions,
batch) in ``cache_dir()/backends``, so later runs reuse it without measuring; the reason says so.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models import ResNet, ResNetConfig
from resnetlab.paths import cache_dir

Forward = Callable[[torch.Tensor], torch.Tensor]
MIN_COSINE = 0.999
MIN_AGREEMENT = 0.99
#: The model families an accuracy check speaks for (see ``family``).
FAMILIES = ("cifar", "imagenet")


def family(config: ResNetConfig) -> str:
    """``cifar`` for the CIFAR stem (checked on the published CIFAR ResNets), ``imagenet`` for every other stem
    (checked on a ResNet-50 on photos)."""
    return "cifar" if config.stem == "cifar" else "imagenet"


@dataclass(frozen=True)
class Backend:
    """One inference path: how to build it, its number format, and whether ``best`` may pick it."""

    summary: str
    numerics: str  # fp32, bf16 or int8
    build: Callable[[ResNet, int | None, torch.Tensor | None], Forward]  # (model, threads, calibration images)
    requires: str | None = None  # the module it needs (an optional extra)
    calibrated: bool = False  # needs calibration images (int8): ``best`` tries it only when given some
    verified_for: tuple[str, ...] = FAMILIES  # model families whose accuracy check it passed: ``best`` may choose it
    cpu_only: bool = True

    def missing(self) -> str | None:
        """Why it cannot run here (a module not installed), or None."""
        if self.requires and find_spec(self.requires) is None:
            return f"needs the {self.requires} package (pip install 'resnetlab[{self.requires}]')"
        return None


def _folded(model: ResNet) -> ResNet:
    from resnetlab.export.fold import fold_batchnorm

    return fold_batchnorm(model.eval())[0]


def _example(model: ResNet) -> torch.Tensor:
    return torch.zeros(2, *model.config.input_size)


def _eager(model: ResNet, threads: int | None, calibration: torch.Tensor | None = None) -> Forward:
    model = model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.float()).float()

    return forward


def _bf16(model: ResNet, threads: int | None, calibration: torch.Tensor | None = None) -> Forward:
    """BN folded, weights and activations in bfloat16, channels-last (oneDNN: AMX/AVX512-BF16 kernels)."""
    net = _folded(model).to(torch.bfloat16, memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return net(x.to(torch.bfloat16, memory_format=torch.channels_last)).float()

    return forward


def _onnx_file(model: ResNet, folder: str, calibration: torch.Tensor | None = None) -> Path:
    """``model`` with BN folded as ONNX in ``folder``; int8 (static, QDQ, uint8 activations) if ``calibration``."""
    from resnetlab.export.artifacts import onnx_export

    path = Path(folder) / "model.onnx"
    onnx_export(_folded(model), _example(model), path)
    if calibration is None:
        return path
    from resnetlab.export.quantize import quantize_onnx_int8

    quantize_onnx_int8(path, path.with_name("int8.onnx"), calibration)
    return path.with_name("int8.onnx")


def _onnxruntime(model: ResNet, threads: int | None, calibration: torch.Tensor | None = None) -> Forward:
    from resnetlab.export.artifacts import onnx_session

    with tempfile.TemporaryDirectory(prefix="resnetlab-backend-") as folder:
        # Idle threads do not spin: they would take the cores from the image decoding threads (and from the
        # other candidates timed in turn by ``choose``).
        return onnx_session(
            _onnx_file(model, folder, calibration), threads=threads, spin=False
        )  # the session holds the model


class _SignalStack(ctypes.Structure):
    """Linux's ``stack_t``: a thread's alternate signal stack."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _signal_stack(new: _SignalStack | None = None) -> _SignalStack | None:
    """This thread's alternate signal stack (set to ``new`` first if given); None where libc has no
    ``sigaltstack``."""
    try:
        sigaltstack = ctypes.CDLL(None, use_errno=True).sigaltstack
    except (OSError, AttributeError):
        return None
    old = _SignalStack()
    sigaltstack(None if new is None else ctypes.byref(new), ctypes.byref(old))
    return old


class OpenVINOModel:
    """An OpenVINO CPU model for an ONNX file, called as a forward function. OpenVINO's default precision
    applies: bfloat16 on CPUs with AMX or AVX512-BF16, fp32 elsewhere (``inference_precision`` tells which).

    OpenVINO's CPU plugin swaps the calling thread's alternate signal stack when it compiles a model and
    swaps it back when the model is destroyed; destroyed in another order than created, the thread is left
    with a freed stack, and the next signal handled on it (Ctrl-C, a child's exit) kills the process with
    SIGSEGV (seen in this project's tests). So the thread's stack is put back as it was after compiling and
    after destroying."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        import openvino as ov

        self._saved = _signal_stack()
        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self._request = self._compiled.create_infer_request()
        self.inference_precision = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        self._restore()

    def _restore(self) -> None:
        saved = getattr(self, "_saved", None)  # None too when __init__ failed before saving it
        if saved is not None:
            _signal_stack(saved)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self._request.infer({0: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out.copy())

    def __del__(self) -> None:
        self._request = self._compiled = None  # OpenVINO's objects go now, then the stack is put back
        self._restore()


def openvino_session(path: str | os.PathLike, *, threads: int | None = None) -> Forward:
    """An OpenVINO CPU model for an ONNX file as a forward function (see ``OpenVINOModel``)."""
    return OpenVINOModel(path, threads=threads)


def _openvino(model: ResNet, threads: int | None, calibration: torch.Tensor | None = None) -> Forward:
    with tempfile.TemporaryDirectory(prefix="resnetlab-backend-") as folder:
        return openvino_session(_onnx_file(model, folder, calibration), threads=threads)


#: Every inference path, by its ``--backend`` name: the one place to add one.
BACKENDS: dict[str, Backend] = {
    "eager": Backend("PyTorch eager, fp32 (the reference)", "fp32", _eager, cpu_only=False),
    "onnxruntime": Backend("ONNX Runtime, fp32, BN folded", "fp32", _onnxruntime, requires="onnxruntime"),
    # The bf16 and int8 paths passed the CIFAR check (bf16 within 0.09 points of fp32, int8 within 0.30, on the
    # published ResNet-20 and ResNet-56, 10,000 images) and failed the ResNet-50 one (ants/bees photos: cosine
    # 0.89-0.97 < 0.999) on the only ResNet-50 to be had offline here (trained from scratch: small logits).
    "bf16": Backend(
        "PyTorch, bfloat16 weights and activations, channels-last, BN folded", "bf16", _bf16, verified_for=("cifar",)
    ),
    "openvino": Backend(
        "OpenVINO, its default precision (bf16 where the CPU has AMX/AVX512-BF16)",
        "bf16",
        _openvino,
        requires="openvino",
        verified_for=("cifar",),
    ),
    "onnxruntime-int8": Backend(
        "ONNX Runtime, int8 (static, per-channel weights, uint8 activations), BN folded",
        "int8",
        _onnxruntime,
        requires="onnxruntime",
        calibrated=True,
        verified_for=("cifar",),
    ),
    "openvino-int8": Backend(
        "OpenVINO running the int8 ONNX graph of onnxruntime-int8",
        "int8",
        _openvino,
        requires="openvino",
        calibrated=True,
        verified_for=("cifar",),
    ),
}


class BackendModel(nn.Module):
    """A backend's forward function behind the ``ResNet`` interface that ``Predictor`` uses."""

    def __init__(self, run: Forward, config: ResNetConfig, name: str, backend: str) -> None:
        super().__init__()
        self.run, self.config, self.backend = run, config, backend
        self.name = f"{name} ({backend})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def build(name: str, model: ResNet, *, threads: int | None = None, calibration: torch.Tensor | None = None) -> Forward:
    """The forward function of backend ``name`` for ``model`` (a clear error where it cannot run).
    ``calibration``: preprocessed images, for the int8 backends."""
    backend = BACKENDS.get(name)
    if backend is None:
        raise ConfigError(f"unknown backend {name!r}; choose best or one of {sorted(BACKENDS)}")
    if why := backend.missing():
        raise ConfigError(f"backend {name} {why}")
    if backend.calibrated and calibration is None:
        raise ConfigError(f"backend {name} needs calibration images: add --calibration-data DATA (e.g. the "
                          "training data), or export an int8 model with `resnetlab export --quantize int8` and "
                          "pass that file instead")  # fmt: skip
    return backend.build(model, threads, calibration if backend.calibrated else None)


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Per-image logits cosine (mean and worst) and top-1 agreement of ``logits`` with ``reference``."""
    cosine = nn.functional.cosine_similarity(logits.float(), reference.float(), dim=1)
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "top1_agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean())}  # fmt: skip


def passes(check: dict[str, float]) -> bool:
    return check["cosine_mean"] >= MIN_COSINE and check["top1_agreement"] >= MIN_AGREEMENT


def check_batch(config: ResNetConfig, count: int = 16, seed: int = 0) -> torch.Tensor:
    """Stand-in images when the caller has none: smooth random colour fields (low-resolution noise,
    upsampled), normalised as the model expects; closer to photos than white noise."""
    g = torch.Generator().manual_seed(seed)
    channels, height, width = config.input_size
    coarse = torch.rand(count, channels, max(2, height // 8), max(2, width // 8), generator=g)
    images = nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    mean = torch.tensor(config.mean).view(1, -1, 1, 1)
    std = torch.tensor(config.std).view(1, -1, 1, 1)
    return (images - mean) / std


def model_fingerprint(model: ResNet) -> str:
    """sha256 of the architecture, config and weights: the cache key's model part."""
    digest = hashlib.sha256(model.name.encode() + json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for key, tensor in model.state_dict().items():
        digest.update(key.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def machine_fingerprint(batch: int, threads: int) -> dict[str, Any]:
    """What makes timings differ between machines and installs: the cache key's machine part."""
    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in _cpuinfo() if line.startswith("flags")), [])
    versions = {m: _version(m) for m in ("torch", "onnxruntime", "openvino")}
    return {"cpu": cpu or platform.processor(), "isa": sorted(f for f in flags if f.startswith(("avx512", "amx"))),
            "cores": os.cpu_count(), "threads": threads, "batch": batch, "versions": versions}  # fmt: skip


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


@dataclass
class Choice:
    """The backend chosen, why, and what was measured for it (``forward`` None when read from the cache)."""

    backend: str
    reason: str
    measured: dict[str, Any] = field(default_factory=dict)
    forward: Forward | None = None


def choose(model: ResNet, *, batch: int = 16, check: torch.Tensor | None = None, threads: int | None = None,
           iters: int = 5, use_cache: bool = True, verify: bool = True,
           calibration: torch.Tensor | None = None) -> Choice:  # fmt: skip
    """Pick the fastest verified backend for ``model`` on this machine (see the module doc).

    ``check``: preprocessed images to compare each candidate with fp32 on (default ``check_batch``);
    ``batch``: the batch size to time at (what the caller will run); ``verify=False`` (random weights, as in
    ``resnetlab benchmark``): the agreement with fp32 is reported but does not exclude, and the paths not
    verified for the model's family are timed too, for the record, though never chosen;
    ``calibration``: images for the int8 backends (without, they are not candidates)."""
    threads = threads or torch.get_num_threads()
    key_parts = {
        "model": model_fingerprint(model),
        "machine": machine_fingerprint(batch, threads),
        "int8": calibration is not None,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:20]
    cached = cache_dir() / "backends" / f"{key}.json"
    if use_cache and cached.is_file():
        try:
            saved = json.loads(cached.read_text())
            if saved.get("backend") in BACKENDS:
                reason = f"{saved['reason']} (measured {saved['when']}, cached in {cached})"
                return Choice(saved["backend"], reason, saved.get("measured", {}))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is measured again
    model = model.eval()
    kind = family(model.config)
    check = check_batch(model.config) if check is None else check
    with torch.inference_mode():
        reference = model(check.float()).float()
    built: dict[str, Forward] = {}
    measured: dict[str, Any] = {}
    for name, backend in BACKENDS.items():
        verified = kind in backend.verified_for
        why = backend.missing() or ("needs calibration images" if backend.calibrated and calibration is None else None)
        if why is None and not verified and verify:
            why = f"its accuracy is not verified for {kind}-stem models"
        if why:
            measured[name] = {"skipped": why}
            continue
        forward = build(name, model, threads=threads, calibration=calibration)
        result = agreement(forward(check), reference)
        measured[name] = {**{k: round(v, 6) for k, v in result.items()}, "passed": passes(result),
                          "verified": verified}  # fmt: skip
        if passes(result) or not verify:
            built[name] = forward
    x = check[:batch] if len(check) >= batch else check.repeat((batch + len(check) - 1) // len(check), 1, 1, 1)[:batch]
    times = time_interleaved(list(built.values()), x.contiguous(), 2, iters)
    for name, t in zip(built, times):
        measured[name]["p50_ms"] = round(1000 * statistics.median(t), 3)
    ranked = sorted((n for n in built if measured[n]["verified"]), key=lambda n: measured[n]["p50_ms"])
    best = ranked[0]
    others = ", ".join(f"{n} {measured[n]['p50_ms']:.1f} ms" for n in ranked[1:])
    faster = [f"{n} {m['p50_ms']:.1f} ms" for n, m in measured.items()
              if n in built and not m["verified"] and m["p50_ms"] < measured[best]["p50_ms"]]  # fmt: skip
    dropped = [f"{n} ({m.get('skipped') or 'failed the accuracy check'})" for n, m in measured.items()
               if n not in built]  # fmt: skip
    reason = (f"{best}: the fastest of {len(ranked)} verified paths at batch {batch} on this CPU "
              f"({measured[best]['p50_ms']:.1f} ms{'; ' + others if others else ''}); logits vs fp32 on "
              f"{len(check)} images: cosine {measured[best]['cosine_mean']:.5f}, top-1 agreement "
              f"{100 * measured[best]['top1_agreement']:.0f}%{'' if verify else ' (not required: random weights)'}"
              + (f"; faster but not verified for {kind}-stem models: {', '.join(faster)}" if faster else "")
              + (f"; not candidates: {', '.join(dropped)}" if dropped else ""))  # fmt: skip
    if use_cache:
        from resnetlab.io import replace_with, write_temporary

        cached.parent.mkdir(parents=True, exist_ok=True)
        entry = {"backend": best, "reason": reason, "measured": measured, "key": key_parts,
                 "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
        replace_with(write_temporary(cached, json.dumps(entry, indent=2).encode()), cached)
    return Choice(best, reason, measured, built[best])


def prepare(model: ResNet | nn.Module, backend: str, *, device: str | torch.device = "cpu", batch: int = 16,
            check: torch.Tensor | None = None, threads: int | None = None,
            calibration: torch.Tensor | None = None) -> tuple[nn.Module, str]:  # fmt: skip
    """``model`` on ``backend`` (a name of ``BACKENDS`` or ``best``) as a module ``Predictor`` can use, and a
    line saying which path runs and why. Exported artifacts run in their own runtime; ``best`` on a GPU
    keeps the PyTorch model (the candidates are CPU paths). ``calibration``: preprocessed images for the
    int8 paths (with them, ``best`` tries those too)."""
    if backend != "best" and backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose best or one of {sorted(BACKENDS)}")
    if not isinstance(model, ResNet):  # an exported artifact
        if backend not in ("best", "eager"):
            raise ConfigError(f"{model.name} is an exported artifact; it runs in its own runtime: drop --backend "
                              f"{backend}, or pass the PyTorch model (run or model folder)")  # fmt: skip
        return model, f"{model.name}: an exported artifact runs in its own runtime"
    if torch.device(device).type != "cpu":
        if backend == "best":
            return model, f"eager: --backend best chooses among CPU paths; on {device} the PyTorch model runs"
        if BACKENDS[backend].cpu_only:
            raise ConfigError(f"backend {backend} runs on the CPU; use --device cpu or --backend eager")
        return model, f"{backend}: asked for with --backend"
    if backend == "best":
        choice = choose(model, batch=batch, check=check, threads=threads, calibration=calibration)
        forward = choice.forward or build(choice.backend, model, threads=threads, calibration=calibration)
        name, reason = choice.backend, choice.reason
    else:
        forward = build(backend, model, threads=threads, calibration=calibration)
        name, reason = backend, f"{backend}: asked for with --backend"
    if name == "eager":
        return model, reason
    return BackendModel(forward, model.config, model.name, name), reason


def time_interleaved(
    runs: list[Callable[[torch.Tensor], Any]], x: torch.Tensor, warmup: int, iters: int
) -> list[list[float]]:
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
