"""``ResNetConfig``: every architectural choice of the family as one frozen, serialisable record.

A named model (``resnet50``, ``resnet56``, ``wrn28_10``, ...) is a row of overrides of these fields in
``resnetlab.models.registry``; ``create_model(name, **overrides)`` applies user overrides on top.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from resnetlab.errors import ConfigError
from resnetlab.models.attention import ATTENTION
from resnetlab.models.layers import ANTI_ALIAS, CONV_LAYERS
from resnetlab.models.shortcuts import SHORTCUT_KINDS
from resnetlab.models.stems import STEM_POOLS, STEM_STRIDE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

#: Largest sizes a config may ask for, checked before anything is built or allocated: a config.json is read
#: from disk and may be damaged or hostile (``layers: [1000000, 3, 3]``, ``input_size: [1, 100000, 100000]``).
#: Every published and named model is far inside them (ResNet-1202: 600 blocks, 19 M parameters).
LIMITS = {
    "stages": 8,  # len(layers)
    "blocks": 2048,  # sum(layers)
    "width": 16384,  # each of widths, stem_channels, width_per_group
    "groups": 1024,
    "in_chans": 1024,
    "num_classes": 1_000_000,
    "input_side": 4096,  # height and width of input_size
    "parameters": 2_000_000_000,  # estimated from the fields, before any tensor exists (8 GB as float32)
}


@dataclass(frozen=True)
class ResNetConfig:
    # Architecture
    block: str = "basic"  # "basic" (two 3x3) or "bottleneck" (1x1, 3x3, 1x1 x4)
    layers: tuple[int, ...] = (2, 2, 2, 2)  # blocks per stage
    widths: tuple[int, ...] = (64, 128, 256, 512)  # "planes" per stage; bottleneck output is 4x
    stem: str = "imagenet"  # "imagenet" (7x7 + pool), "deep" (3x 3x3, ResNet-C), "deep_tiered", "cifar" (3x3)
    stem_channels: int = 64
    stem_pool: str = "max"  # "max", "conv" (ResNet-RS: a strided 3x3 conv), "bit" (zero-pad, unpadded max-pool)
    shortcut: str = "B"  # "A" zero-pad, "B" project where shape changes, "C" project always, "none" = plain
    avg_down: bool = False  # ResNet-D: average-pool before the projection instead of a strided 1x1
    stride_in_1x1: bool = False  # bottleneck stride in the first 1x1 ("v1", the paper) or the 3x3 ("v1.5")
    preact: bool = False  # pre-activation ordering (BN-ReLU-conv), He et al. 2016
    groups: int = 1  # ResNeXt cardinality
    width_per_group: int = 64  # ResNeXt/Wide ResNet bottleneck width per group
    output_stride: int | None = None  # 8 or 16: replace late strides by dilation (segmentation)
    attention: str = "none"  # on each block's branch output: "se" (Hu et al. 2018), "eca" (Wang et al. 2020)
    attention_ratio: float = 1 / 16  # SE reduction (ResNet-RS: 1/4)
    anti_alias: str = "none"  # "avg" or "blur": filter before every subsampling (Zhang 2019)
    selective_kernel: bool = False  # basic blocks: the first 3x3 is a selective-kernel conv (Li et al. 2019)
    conv_layer: str = "conv"  # "conv", or "std_conv": weight standardisation (BiT, with norm_layer="groupnorm")
    # Regularisation and initialisation
    block_dropout: float = 0.0  # dropout between the convs of each block (Wide ResNet)
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing with depth
    zero_init_residual: bool = False  # zero the last norm of each branch: blocks start as identities
    norm_layer: str = "batchnorm"  # batchnorm | syncbatchnorm | frozen_batchnorm | groupnorm[N]
    # Input and output
    num_classes: int = 1000
    in_chans: int = 3
    # Default preprocessing (carried into saved models so predict/export never re-type it)
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    label_names: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self._check_bounds()
        if self.block not in ("basic", "bottleneck"):
            raise ConfigError(f"block must be 'basic' or 'bottleneck', not {self.block!r}")
        if self.stem not in STEM_STRIDE:
            raise ConfigError(f"stem must be one of {sorted(STEM_STRIDE)}, not {self.stem!r}")
        if self.shortcut not in SHORTCUT_KINDS:
            raise ConfigError(f"shortcut must be one of {SHORTCUT_KINDS}, not {self.shortcut!r}")
        if len(self.layers) != len(self.widths) or not self.layers:
            raise ConfigError(f"layers {self.layers} and widths {self.widths} must have the same length")
        for name, valid in (("stem_pool", STEM_POOLS), ("attention", ATTENTION), ("anti_alias", ANTI_ALIAS),
                            ("conv_layer", CONV_LAYERS)):  # fmt: skip
            if getattr(self, name) not in valid:
                raise ConfigError(f"{name} must be one of {sorted(valid)}, not {getattr(self, name)!r}")
        if self.preact and (self.attention != "none" or self.anti_alias != "none" or self.selective_kernel):
            raise ConfigError("attention, anti_alias and selective_kernel are options of post-activation blocks")
        if self.selective_kernel and self.block != "basic":
            raise ConfigError("selective_kernel replaces the first 3x3 of a basic block; use block='basic'")
        if not 0.0 < self.attention_ratio <= 1.0:
            raise ConfigError(f"attention_ratio must be in (0, 1], not {self.attention_ratio}")
        if any(n < 1 for n in self.layers):
            raise ConfigError(f"every stage needs at least one block: layers={self.layers}")
        if self.output_stride is not None and self.output_stride not in self.possible_output_strides():
            raise ConfigError(
                f"output_stride={self.output_stride} is not reachable; choose one of {self.possible_output_strides()}"
            )
        if self.in_chans < 1 or self.num_classes < 0:
            raise ConfigError("in_chans must be >= 1 and num_classes >= 0")
        if self.label_names is not None and len(self.label_names) != self.num_classes:
            object.__setattr__(self, "label_names", None)  # a new head invalidates the old names
        for name in ("block_dropout", "drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), not {getattr(self, name)}")

    def _check_bounds(self) -> None:
        """Types and sizes within ``LIMITS`` (first, so nothing below computes with absurd values)."""

        def integers(name: str, values: Any) -> tuple[int, ...]:
            values = values if isinstance(values, tuple) else (values,)
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"{name} must be whole numbers, not {getattr(self, name)!r}")
            return values

        def at_most(name: str, values: tuple[int, ...], limit: int, what: str = "") -> None:
            if max(values) > limit:
                raise ConfigError(f"{name}={getattr(self, name)!r} exceeds the limit of {limit:,}{what} "
                                  "(a damaged or hostile config?)")  # fmt: skip

        layers = integers("layers", self.layers)
        at_most("layers", (len(layers),), LIMITS["stages"], " stages")
        at_most("layers", (sum(layers),), LIMITS["blocks"], " blocks in all")
        for name in ("widths", "stem_channels", "width_per_group"):
            at_most(name, integers(name, getattr(self, name)), LIMITS["width"])
        for name in ("groups", "in_chans", "num_classes"):
            at_most(name, integers(name, getattr(self, name)), LIMITS[name])
        size = integers("input_size", self.input_size)
        if len(size) != 3 or min(size) < 1:
            raise ConfigError(f"input_size must be (channels, height, width) of positive sizes, not {self.input_size}")
        at_most("input_size", size[1:], LIMITS["input_side"], " pixels a side")
        params = self.estimated_params() if len(layers) == len(self.widths) and min(layers) >= 1 else 0
        if params > LIMITS["parameters"]:
            raise ConfigError(f"this config would have about {params:,} parameters, more than the limit of "
                              f"{LIMITS['parameters']:,} (layers={self.layers}, widths={self.widths})")  # fmt: skip

    def estimated_params(self) -> int:
        """Parameters of the convolutions and the classifier, from the fields alone (no model is built);
        within a few percent of ``count_params`` (norms and the stem's extras are left out)."""
        total, channels = 49 * self.in_chans * self.stem_channels, self.stem_channels
        for blocks, planes in zip(self.layers, self.widths):
            out = planes * self.expansion
            if self.block == "bottleneck":
                width = planes * self.width_per_group // 64 * self.groups
                first = channels * width + 9 * width * width // self.groups + width * out
                rest = out * width + 9 * width * width // self.groups + width * out
            else:
                first, rest = 9 * channels * planes + 9 * planes * out, 18 * planes * out
            total += first + channels * out + (blocks - 1) * rest  # (+ the first block's projection)
            channels = out
        return total + channels * self.num_classes

    # Derived facts
    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def num_features(self) -> int:
        """Channels entering the classifier."""
        return self.widths[-1] * self.expansion

    @property
    def stage_strides(self) -> tuple[int, ...]:
        return (1,) + (2,) * (len(self.layers) - 1)

    @property
    def total_stride(self) -> int:
        stride = STEM_STRIDE[self.stem]
        for s in self.stage_strides:
            stride *= s
        return stride

    @property
    def depth(self) -> int:
        """Weighted layers as the papers count them: stem conv + convs in blocks + classifier."""
        return 1 + sum(self.layers) * (3 if self.block == "bottleneck" else 2) + 1

    def possible_output_strides(self) -> tuple[int, ...]:
        stride, options = STEM_STRIDE[self.stem], []
        for s in self.stage_strides:
            stride *= s
            options.append(stride)
        return tuple(sorted(set(options)))

    # Serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; valid keys: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return _build(cls, values)

    def replace(self, **overrides: Any) -> ResNetConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown model option(s) {sorted(unknown)}; valid options: {', '.join(sorted(known))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return _build(type(self), {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **values})


def _build(cls: type[ResNetConfig], values: dict[str, Any]) -> ResNetConfig:
    """Construct, turning the type errors of malformed values (e.g. from an untrusted config.json) into
    a ConfigError that names the problem."""
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"invalid model configuration: {err}") from err
