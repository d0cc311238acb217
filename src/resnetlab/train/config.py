"""``TrainConfig``: every knob of a training run, loaded from a named recipe and overridden by the user.

Recipes are YAML files in ``resnetlab/recipes/`` (``cifar-paper``, ``imagenet-v1``, ``imagenet-modern``,
``finetune``, ``demo``); a path to any YAML file works too, so users copy one and edit it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from resnetlab.errors import ConfigError

#: torch.compile modes; the ones that record CUDA graphs need a CUDA device.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    # What to train on
    model: str = "resnet20"
    model_options: dict[str, Any] = field(default_factory=dict)  # ResNetConfig overrides
    pretrained: str | None = None
    data: str | None = None  # None = the bundled digits
    image_size: int | None = None
    augment: str = "auto"
    auto_augment: str | None = None
    random_erasing: float = 0.0
    val_split: float = 0  # fraction or count held out of train (0: evaluate on the test split)
    download: bool = False
    mean: list[float] | None = None
    std: list[float] | None = None
    # Optimisation
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = False
    batch_size: int = 128  # global batch (split across processes under torchrun)
    epochs: int = 10
    max_iters: int | None = None  # if set, training stops after this many steps (overrides epochs)
    schedule: str = "step"  # step | cosine | constant
    milestones: list[int] = field(default_factory=list)  # in iterations when milestone_unit == "iter"
    milestone_unit: str = "epoch"  # epoch | iter
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_lr: float | None = None  # constant warm-up lr (the paper's 0.01); None = linear from 0
    warmup_min_depth: int = 0  # apply the warm-up only to nets at least this deep (cifar-paper: 110)
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    ema_decay: float = 0.0  # 0 disables EMA weights
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
        choices = {
            "optimizer": ("sgd", "adamw"), "schedule": ("step", "cosine", "constant"),
            "milestone_unit": ("epoch", "iter"), "amp": ("auto", "bf16", "fp16", "off"),
            "compile_mode": COMPILE_MODES, "optimizer_impl": ("auto", "fused", "foreach", "loop"),
        }  # fmt: skip
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {allowed}")
        self.channels_last = _auto_or_bool("channels_last", self.channels_last)
        for key in ("lr", "batch_size", "epochs"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if self.max_iters is not None and self.max_iters <= 0:
            raise ConfigError(f"max_iters must be positive, got {self.max_iters}")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"compile_mode={self.compile_mode!r} needs compile: true (--compile {self.compile_mode})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> TrainConfig:
        fields = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; valid options: {', '.join(sorted(fields))}")
        return dataclasses.replace(self, **{k: _coerce(k, fields[k].type, v) for k, v in overrides.items()})


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type (YAML reads ``1e-3`` as a string, for one)."""
    kind = str(annotation)
    if value is None:
        if "None" not in kind:
            raise ConfigError(f"{key} needs a value (it cannot be empty/null)")
        return None
    try:
        if kind.startswith(("str", "dict", "list")):
            expected = {"str": str, "dict": dict, "list": list}[kind.split("[")[0].split(" ")[0]]
            if not isinstance(value, expected):
                raise ValueError(value)
            return value
        if kind.startswith("bool"):
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, bool):
                return value
            raise ValueError(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value))
        if kind.startswith("float"):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {kind.split(' |')[0]}") from None
    return value


def _auto_or_bool(key: str, value: Any) -> bool | Literal["auto"]:
    """``auto``, or a boolean (YAML's and the command line's spellings of one)."""
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    raise ConfigError(f"{key}={value!r} is not auto, true or false")


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


def load_recipe(name_or_path: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """A named recipe (``cifar-paper``) or a YAML file, with ``overrides`` applied on top."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a folder named like a recipe is not one
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read recipe {path}: {err}") from err
        name = path.stem
    else:
        name = str(name_or_path)
        resource = resources.files("resnetlab.recipes") / f"{name}.yaml"
        if not resource.is_file():
            raise ConfigError(f"unknown recipe {name!r}; choose one of {recipe_names()} or pass a YAML file")
        text = resource.read_text()
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {name_or_path} is not valid YAML: {err}") from err
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ConfigError(f"recipe {name_or_path} must be a mapping of option names to values")
    return TrainConfig(recipe=name).replace(**{**values, **overrides})


def parse_set_option(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line, the value parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip().replace("-", "_"), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse the value of {key}: {err}") from err
