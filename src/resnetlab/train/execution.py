"""How a run executes: the device, the autocast dtype and the memory format, resolved from the config.

``amp: auto`` is bf16 autocast on CUDA and on CPUs with native bf16 instructions (AVX512-BF16 or AMX;
Arm's BF16), fp32 elsewhere: bf16 on a CPU that only emulates it is slower than fp32. ``channels_last:
auto`` is on wherever the convolutions run faster in NHWC: on CPU, and on CUDA with AMP (tensor cores).
The chosen path is one line, the first of a run's log.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from resnetlab.errors import ConfigError

#: autocast dtype for each explicit ``amp`` value (``auto`` is resolved per device).
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX, Arm BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: the local rank's GPU when CUDA is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible; use --device cpu")
    return device


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes in bf16 natively (read from /proc/cpuinfo; PyTorch's own probe elsewhere)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up with care
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(re.split(r"\s+", value.strip()))
    return bool(flags & NATIVE_BF16_FLAGS)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: fp32). bf16 asked for on a CPU without native
    bf16 falls back to fp32 with a warning (emulated, it is several times slower)."""
    if amp == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else None
    if amp not in AMP_DTYPES:
        raise ConfigError(f"amp={amp!r} is not one of auto, {', '.join(AMP_DTYPES)}")
    if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("amp=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where it is emulated and "
                      "slower than fp32; training in fp32 instead", stacklevel=2)  # fmt: skip
        return None
    return AMP_DTYPES[amp]


def use_channels_last(setting: bool | str, device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """``channels_last`` resolved. ``auto`` is on where NHWC convolutions are faster: on CPU (oneDNN; a
    ResNet-20 training step on this project's Xeon: +21% in bf16, +23% in fp32, see docs/training.md) and
    on CUDA under reduced-precision autocast (tensor cores); off elsewhere (MPS, fp32 on CUDA)."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cpu" or (device.type == "cuda" and amp_dtype is not None)


@dataclass(frozen=True)
class ExecutionPlan:
    """What a run executes on; ``describe()`` is the first line of its log."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: str | None  # the torch.compile mode, None when eager
    threads: int
    amp_setting: str = "auto"
    channels_last_setting: bool | str = "auto"

    @classmethod
    def resolve(cls, *, device: str, amp: str, channels_last: bool | str, compile: bool, compile_mode: str,
                local_rank: int = 0) -> ExecutionPlan:  # fmt: skip
        dev = resolve_device(device, local_rank)
        dtype = autocast_dtype(amp, dev)
        return cls(dev, dtype, use_channels_last(channels_last, dev, dtype), compile_mode if compile else None,
                   torch.get_num_threads(), amp, channels_last)  # fmt: skip

    def describe(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[self.amp_dtype]
        why = ""
        if self.amp_setting == "auto" and self.device.type == "cpu":
            why = " (auto: this CPU has native bf16)" if self.amp_dtype else " (auto: no native bf16 on this CPU)"
        layout = "channels_last" if self.channels_last else "contiguous (NCHW)"
        if self.channels_last_setting == "auto":
            layout += " (auto)"
        threads = f", {self.threads} threads" if self.device.type == "cpu" else ""
        compiled = f"torch.compile {self.compile}" if self.compile else "eager (no torch.compile)"
        return f"execution: device {self.device}{threads} | {amp}{why} | {layout} | {compiled}"
