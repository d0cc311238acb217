"""``TrainConfig``: every knob of a training run, loaded from a named recipe and overridden by the user.

Recipes are YAML files in ``resnetlab/recipes/`` (``cifar-paper``, ``cifar-fast``, ``imagenet-v1``,
``imagenet-modern``, ``imagenet-torchvision``, ``imagenet-rsb-a1``/``-a2``/``-a3``, ``finetune``, ``demo``);
a path to any YAML file works too, so users copy one and edit it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from resnetlab.errors import ConfigError

#: torch.compile modes; the ones that record CUDA graphs need a CUDA device.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

#: Options with a fixed set of values.
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adamw", "lamb"), "schedule": ("step", "cosine", "constant"),
    "milestone_unit": ("epoch", "iter"), "schedule_unit": ("iter", "epoch"), "loss": ("ce", "bce"),
    "interpolation": ("bilinear", "bicubic"),
    "amp": ("auto", "bf16", "fp16", "off"), "compile_mode": COMPILE_MODES,
    "optimizer_impl": ("auto", "fused", "foreach", "loop"),
}  # fmt: skip
#: How ``--device`` is spelled: auto, cpu, mps, cuda, cuda:N (xpu likewise).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d{1,3})?")
MAX_SEED = 2**32 - 1  # numpy's and DataLoader workers' seeds are 32-bit
MAX_IMAGE_SIZE = 4096  # a side of 100k pixels would allocate tens of GB per image before training starts
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a short list of options

#: Numeric options and what their values (each item, for lists) must satisfy: one row per option.
BOUNDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v > 0, "> 0"),
    "batch_size": (lambda v: v > 0, "a positive integer"),
    "epochs": (lambda v: v > 0, "a positive integer"),
    "max_iters": (lambda v: v > 0, "a positive integer"),
    "image_size": (lambda v: 0 < v <= MAX_IMAGE_SIZE, f"a positive integer up to {MAX_IMAGE_SIZE}"),
    "eval_image_size": (lambda v: 0 < v <= MAX_IMAGE_SIZE, f"a positive integer up to {MAX_IMAGE_SIZE}"),
    "eval_resize": (lambda v: 0 < v <= MAX_IMAGE_SIZE, f"a positive integer up to {MAX_IMAGE_SIZE}"),
    "accum_steps": (lambda v: v > 0, "a positive integer (1: no accumulation)"),
    "repeated_aug": (lambda v: v > 0, "a positive integer (1: off; torchvision and RSB use 4 and 3)"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "warmup_start": (lambda v: 0 <= v <= 1, "a fraction of lr in [0, 1] (e.g. 0.01)"),
    "bce_target_thresh": (lambda v: 0 <= v < 1, "in [0, 1) (e.g. 0.2)"),
    "ema_every": (lambda v: v > 0, "a positive number of steps"),
    "num_workers": (lambda v: v >= 0, ">= 0 (0: load in the main process)"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, f"in 0..{MAX_SEED}"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1) (e.g. 0.1)"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1) (e.g. 0.9999; 0 turns EMA off)"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "random_erasing": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "gamma": (lambda v: v > 0, "> 0"),
    "val_split": (lambda v: v >= 0, ">= 0 (a fraction below 1, or a count)"),
    "mixup_alpha": (lambda v: v >= 0, ">= 0 (0: off)"),
    "cutmix_alpha": (lambda v: v >= 0, ">= 0 (0: off)"),
    "warmup_iters": (lambda v: v >= 0, ">= 0"),
    "warmup_lr": (lambda v: v > 0, "> 0"),
    "warmup_min_depth": (lambda v: v >= 0, ">= 0"),
    "milestones": (lambda v: v >= 0, "a list of non-negative integers, e.g. [30, 60]"),
    "std": (lambda v: v > 0, "a list of positive numbers"),
    "eval_every": (lambda v: v >= 0, ">= 0 (0: once per epoch)"),
    "checkpoint_every": (lambda v: v >= 0, ">= 0 (0: once per epoch)"),
}


@dataclass
class TrainConfig:
    # What to train on
    model: str = "resnet20"
    model_options: dict[str, Any] = field(default_factory=dict)  # ResNetConfig overrides
    pretrained: str | None = None
    data: str | None = None  # None = the bundled digits
    image_size: int | None = None
    augment: str = "auto"
    auto_augment: str | None = None  # trivialaugment | randaugment | ... | timm's "rand-m7-mstd0.5-inc1"
    random_erasing: float = 0.0
    repeated_aug: int = 1  # each image this many times per batch, on different ranks (Hoffer et al. 2020)
    interpolation: str = "bilinear"  # of the random-resized crop and the eval resize: bilinear | bicubic
    eval_image_size: int | None = None  # the eval center crop; None: image_size (the train crop)
    eval_resize: int | None = None  # eval: resize the short side to this, then center-crop; None: the default
    val_split: float = 0  # fraction or count held out of train (0: evaluate on the test split)
    download: bool = False
    mean: list[float] | None = None
    std: list[float] | None = None
    # Optimisation
    optimizer: str = "sgd"  # sgd | adamw | lamb (timm's; the train extra)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = False  # no weight decay on 1-D tensors: norm weights and every bias (timm)
    no_decay_norm: bool = False  # no weight decay on norm layers only (torchvision's --norm-weight-decay 0)
    batch_size: int = 128  # global batch of one optimizer step (split across processes under torchrun)
    accum_steps: int = 1  # micro-batches (of batch_size / accum_steps) accumulated into each optimizer step
    epochs: int = 10
    max_iters: int | None = None  # if set, training stops after this many optimizer steps (overrides epochs)
    schedule: str = "step"  # step | cosine | constant
    schedule_unit: str = "iter"  # iter: the lr changes every step; epoch: once per epoch (torchvision, timm)
    milestones: list[int] = field(default_factory=list)  # in iterations when milestone_unit == "iter"
    milestone_unit: str = "epoch"  # epoch | iter
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_lr: float | None = None  # constant warm-up lr (the paper's 0.01); None = linear from 0
    warmup_min_depth: int = 0  # apply the warm-up only to nets at least this deep (cifar-paper: 110)
    warmup_epochs: int = 0  # the warm-up in epochs instead of warmup_iters
    warmup_start: float | None = None  # linear warm-up from this fraction of lr (torchvision: 0.01); None: from 0
    loss: str = "ce"  # ce (softmax cross-entropy) | bce (one-vs-all binary cross-entropy, RSB)
    bce_target_thresh: float | None = None  # bce: targets above this become 1, the others 0 (timm's option)
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    ema_decay: float = 0.0  # 0 disables EMA weights; the decay of one EMA update
    ema_every: int = 1  # optimizer steps between EMA updates (torchvision: 32)
    grad_clip: float = 0.0
    # Execution
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16, else off) | bf16 | fp16 | off
    channels_last: Literal["auto"] | bool = "auto"  # auto: on where faster (CPU; CUDA with amp)
    compile: bool = False
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    optimizer_impl: str = "auto"  # auto (fused where the device has the kernels) | fused | foreach | loop
    data_on_device: bool = True  # small in-memory datasets: DeviceBatches instead of a DataLoader
    num_workers: int = 2
    sync_bn: bool = False
    deterministic: bool = False
    seed: int = 0
    # Outputs
    run_dir: str | None = None
    auto_resume: bool = False  # continue from run_dir's last checkpoint if there is one (torchrun restarts)
    runs_root: str = "runs"
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch
    checkpoint_every: int = 0  # steps between checkpoints; 0 = once per epoch
    tensorboard: bool = True
    progress: bool = True
    recipe: str = "demo"

    def __post_init__(self) -> None:
        """Coerce every field to its type and check it, so a bad value fails here, in one line, naming it."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={_short(getattr(self, key))} is not one of {allowed}")
        for key, (test, what) in BOUNDS.items():
            value = getattr(self, key)
            if any(item is not None and not test(item) for item in (value if isinstance(value, list) else [value])):
                raise ConfigError(f"{key}={_short(value)}: {key} must be {what}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"device={_short(self.device)} is not a device; use auto, cpu, cuda, cuda:N or mps")
        for a, b in (("warmup_iters", "warmup_epochs"), ("no_decay_norm_bias", "no_decay_norm")):
            if getattr(self, a) and getattr(self, b):
                raise ConfigError(f"{a} and {b} are two ways of saying one thing; set one of them")
        if self.schedule_unit == "epoch" and (self.warmup_iters or self.milestone_unit == "iter"):
            raise ConfigError("schedule_unit=epoch changes the lr once per epoch: give the warm-up as warmup_epochs "
                              "and milestones in epochs")  # fmt: skip
        if self.eval_resize is not None:
            crop = self.eval_image_size or self.image_size
            if crop is None or self.eval_resize < crop:
                raise ConfigError(f"eval_resize={self.eval_resize} resizes the short side before the center crop: set "
                                  "image_size (or eval_image_size), and a resize at least that large")  # fmt: skip
        if self.bce_target_thresh is not None and self.loss != "bce":
            raise ConfigError("bce_target_thresh applies to loss=bce only")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"compile_mode={self.compile_mode!r} needs compile: true (--compile {self.compile_mode})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            listed = ", ".join(_short(k) for k in unknown)
            raise ConfigError(f"unknown training option(s) {listed}; valid options: {', '.join(sorted(fields))}")
        return dataclasses.replace(self, **overrides)  # __post_init__ coerces and checks


def _to_int(value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            value = float(value)  # "1e3"
    if isinstance(value, float):
        if not value.is_integer():  # also inf and nan
            raise ValueError(value)
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    number = float(value)  # YAML 1.1 reads 1e-3 as a string; huge ints raise OverflowError
    if not math.isfinite(number):
        raise ValueError(value)
    return number


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ValueError(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _to_auto_or_bool(value: Any) -> bool | Literal["auto"]:
    """``auto``, or a boolean (YAML's and the command line's spellings of one)."""
    return "auto" if value == "auto" else _to_bool(value)


def _to_mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(value)
    return dict(value)


#: The field types of TrainConfig (as their annotations spell them) -> the function that converts a value.
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "int": _to_int, "float": _to_float, "bool": _to_bool, "str": _to_str, "dict": _to_mapping,
    "Literal['auto'] | bool": _to_auto_or_bool,
}  # fmt: skip
#: How an error message names the types whose annotation is not a plain word.
_TYPE_NAMES = {"Literal['auto'] | bool": "auto, true or false"}


def converter_for(annotation: Any) -> tuple[str, bool, Callable[[Any], Any]]:
    """A TrainConfig field's type as messages name it (``int``, ``list[int]``), whether it is a list, and the
    function that converts one value (each item, of a list); KeyError for a type ``_CONVERTERS`` lacks."""
    kind = str(annotation).replace('"', "'").removesuffix(" | None")
    if kind.startswith("list["):
        return kind, True, _CONVERTERS[kind.removeprefix("list[").removesuffix("]")]
    return kind, False, _CONVERTERS.get(kind) or _CONVERTERS[kind.partition("[")[0]]


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type: ``int | None``, ``list[int]``, ``dict[str, Any]``, ..."""
    if value is None:
        if not str(annotation).endswith("| None"):
            raise ConfigError(f"{key} needs a value (it cannot be empty/null)")
        return None
    kind, is_list, convert = converter_for(annotation)
    try:
        if is_list:
            if not isinstance(value, (list, tuple)):
                raise TypeError(value)
            return [convert(item) for item in value]
        return convert(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}={_short(value)} is not {_TYPE_NAMES.get(kind, f'a valid {kind}')}") from None


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 2
MAX_SHOWN = 80  # characters of a value shown in an error message


def _short(value: Any) -> str:
    """A bounded repr for error messages: a huge value must not flood the terminal (or take long to print)."""
    try:
        text = _REPR.repr(value)  # reprlib looks at a few items per level only, so this is fast too
    except ValueError:  # an int of more than 4300 digits has no repr
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


#: Options a resumed run may change: how it runs and what it reports, not what it computes.
RESUME_SAFE = frozenset({
    "device", "num_workers", "progress", "tensorboard", "eval_every", "checkpoint_every", "auto_resume",
    "compile", "compile_mode", "channels_last",
})  # fmt: skip


def resume_config(saved: dict[str, Any], requested: TrainConfig | None, run_dir: Path) -> TrainConfig:
    """The config a resumed run continues with: the checkpoint's, with the changes ``requested`` makes to
    ``RESUME_SAFE`` options applied. Any other change is a ConfigError naming it: a resumed run is the run
    that was saved, and silently ignoring (or applying) a new lr or schedule would be a different run."""
    base = TrainConfig(recipe=str(saved.get("recipe", "demo"))).replace(**saved)
    base.run_dir = str(run_dir)
    if requested is None:
        return base
    changed = {f.name: getattr(requested, f.name) for f in dataclasses.fields(TrainConfig)
               if getattr(requested, f.name) != getattr(base, f.name)}  # fmt: skip
    if changed.get("run_dir") is None or Path(changed["run_dir"]).resolve() == run_dir.resolve():
        changed.pop("run_dir", None)  # the run continues in its folder, wherever that is now
    unsafe = sorted(set(changed) - RESUME_SAFE)
    if unsafe:
        listed = ", ".join(f"{k}: {getattr(base, k)!r} -> {changed[k]!r}" for k in unsafe)
        raise ConfigError(
            f"resuming {run_dir} continues the saved run, but these options differ from it: {listed}. Drop "
            f"them, or start a new run. Only {', '.join(sorted(RESUME_SAFE))} may change on resume"
        )
    return base.replace(**changed)


def recipe_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("resnetlab.recipes").iterdir()
                  if p.name.endswith(".yaml"))  # fmt: skip


class _RecipeLoader(yaml.SafeLoader):
    """YAML with the core schema of YAML 1.2 and without aliases.

    YAML 1.1 (PyYAML's default) reads ``off``/``no``/``on``/``y`` as booleans, so ``--set amp=off`` arrived as
    False; ``1:30`` as 90 and ``010`` as 8; and ``1e-3`` as a string. Here only true/false are booleans and
    numbers are decimal. Aliases (``*a``) are refused: a 700-byte "billion laughs" of nested aliases expands
    to gigabytes.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not supported in recipes: write the value out", event.start_mark
            )
        return super().compose_node(parent, index)


_YAML11_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp")}
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _pattern, _first in (
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?[0-9]+", "-+0123456789"),
    (
        "float",
        r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
        "-+.0123456789",
    ),
):
    _RecipeLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))
_RecipeLoader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node)))


def parse_yaml(text: str, what: str) -> Any:
    """``text`` as YAML (see ``_RecipeLoader``); ConfigError naming ``what`` when it is not valid."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: no Python objects
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{what} is not valid YAML: {err.problem or err.context}{where}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {_short(str(err))}") from None
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply to be a training option") from None
    except ValueError as err:  # e.g. an int of more than 4300 digits
        raise ConfigError(f"{what} cannot be read: {_short(str(err))}") from None


def _read_recipe_file(path: Path) -> str:
    """The text of a recipe file: a regular file of at most MAX_RECIPE_BYTES (a FIFO would block forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise ConfigError(f"cannot read recipe {path}: {err.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"recipe {path} is not a regular file; pass a YAML file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_RECIPE_BYTES + 1)
    if len(data) > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {path} is larger than {MAX_RECIPE_BYTES >> 20} MiB; a recipe is a list of options")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not UTF-8 text") from None


def load_recipe(name_or_path: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """A named recipe (``cifar-paper``) or a YAML file, with ``overrides`` applied on top."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or (path.exists() and not path.is_dir()):  # a folder named `demo` is not one
        text, name = _read_recipe_file(path), path.stem
    else:
        name = str(name_or_path)
        resource = resources.files("resnetlab.recipes") / f"{name}.yaml"
        if not resource.is_file():
            raise ConfigError(f"unknown recipe {_short(name)}; choose one of {recipe_names()} or pass a YAML file")
        text = resource.read_text()
    values = parse_yaml(text, f"recipe {name_or_path}") or {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ConfigError(f"recipe {name_or_path} must be a mapping of option names to values")
    return TrainConfig(recipe=name).replace(**{**values, **overrides})


def parse_set_option(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line, the value parsed as YAML (numbers, lists, booleans: true/false;
    ``off``, ``no`` and ``on`` stay words, as typed)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {_short(text)}")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    return key, parse_yaml(value, f"the value of --set {_short(key)}")
