"""``train(config)``: the training engine behind ``resnetlab train``, on one device or many (torchrun).

The loop counts optimizer steps; epochs are how the data is walked. Everything a resumed run needs is in
the checkpoint (model, optimizer, schedule, AMP scaler, EMA, RNG states, epoch and batch position), so a
run killed at any point and resumed ends with the same weights as an uninterrupted one (in deterministic
mode, with device-resident data or ``num_workers=0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.data import DataBundle, build_data
from resnetlab.data.cache import cache_file_for
from resnetlab.errors import ConfigError, DataError, ResNetLabError
from resnetlab.models import ResNet, ResNetConfig, create_model, save_pretrained
from resnetlab.paths import cache_dir
from resnetlab.train import distributed as dist
from resnetlab.train.batches import TrainBatches
from resnetlab.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from resnetlab.train.config import CUDA_GRAPH_MODES, TrainConfig, resume_config
from resnetlab.train.evaluation import evaluate, workers_for
from resnetlab.train.execution import ExecutionPlan, resolve_device
from resnetlab.train.metrics import MetricsLogger, RunProgress, Throughput, epoch_of, plot_curves
from resnetlab.train.params import parameter_groups
from resnetlab.train.rundir import RunDir


class TrainingDiverged(ResNetLabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(ResNetLabError):
    """SIGINT/SIGTERM: a checkpoint was saved and the run can be resumed."""


@dataclass
class StepInfo:
    """What callbacks see after every optimizer step."""

    step: int
    epoch: int
    loss: float
    lr: float
    model: nn.Module
    total_steps: int


@dataclass
class TrainResult:
    """What a run did. ``best_accuracy``: the peak eval top-1 (on val when there is a val split, else on
    test, where it is only a curve: the exported model is then the final one); ``final_accuracy``: the last
    eval; ``test_accuracy``: the exported model on the test set."""

    run_dir: Path
    model: nn.Module
    steps: int
    epochs: int
    history: list[dict[str, Any]]
    best_accuracy: float
    final_accuracy: float
    model_dir: Path
    seconds: float
    images_per_second: float
    test_accuracy: float | None = None  # the exported model (``selected``) on the test set, when there is one
    selected: str = "final"  # which weights model_dir holds: "best-val" (chosen on the val split) or "final"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def evaluated(self) -> bool:
        """Whether the run had a split to evaluate on (else the accuracies are undefined: None in summary)."""
        return math.isfinite(self.final_accuracy)

    def summary(self) -> dict[str, Any]:
        best, final = (self.best_accuracy, self.final_accuracy) if self.evaluated else (None, None)
        return {
            "run_dir": str(self.run_dir), "model_dir": str(self.model_dir), "steps": self.steps,
            "epochs": self.epochs, "best_accuracy": best, "final_accuracy": final,
            "test_accuracy": self.test_accuracy, "selected": self.selected, "seconds": round(self.seconds, 2),
            "images_per_second": round(self.images_per_second, 1),
        }  # fmt: skip


# ------------------------------------------------------------------------------------------ set-up
def build_model(cfg: TrainConfig, bundle: DataBundle) -> ResNet:
    """The model for this data: its head, input channels and preprocessing follow the dataset."""
    size = bundle.eval_size or bundle.image_size  # what the model is given at test time
    model = create_model(
        cfg.model, cfg.pretrained, num_classes=bundle.num_classes, in_chans=bundle.in_chans,
        input_size=(bundle.in_chans, size, size), mean=tuple(bundle.mean), std=tuple(bundle.std),
        crop_pct=eval_crop_pct(cfg, size), label_names=tuple(bundle.classes), **cfg.model_options,
    )  # fmt: skip
    assert isinstance(model, ResNet)
    return model


def eval_crop_pct(cfg: TrainConfig, eval_size: int) -> float:
    """The eval crop's share of the resized short side: ``eval_resize`` when set, else 1 for small images
    and 0.875 for photos."""
    if cfg.eval_resize:
        return eval_size / cfg.eval_resize
    return 1.0 if eval_size <= 64 else 0.875


def fused_devices() -> list[str]:
    """Device types with fused optimizer kernels in this PyTorch (CUDA, CPU, MPS, ... in 2.4+)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return list(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older or newer PyTorch without the helper
        return ["cuda"]


def optimizer_kernels(impl: str, device: torch.device) -> dict[str, bool | None]:
    """``fused``/``foreach`` arguments for ``optimizer_impl``: ``fused`` updates every parameter in one
    kernel, ``foreach`` in a few batched ones, ``loop`` one at a time; ``auto`` is fused where the device
    has the kernels, else PyTorch's own choice."""
    supported = device.type in fused_devices()
    if impl == "fused" and not supported:
        raise ConfigError(f"optimizer_impl=fused: no fused optimizer kernels for {device.type} in this PyTorch; "
                          "use foreach or loop")  # fmt: skip
    if impl == "fused" or (impl == "auto" and supported):
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    return {"foreach": False} if impl == "loop" else {}


def lamb_class() -> type[torch.optim.Optimizer]:
    """timm's LAMB (You et al. 2020), the optimizer of ResNet strikes back; a ConfigError naming the extra
    to install when timm is missing."""
    try:
        from timm.optim import Lamb
    except ImportError:
        raise ConfigError("optimizer=lamb uses timm's LAMB: pip install 'resnetlab[train]' (or timm)") from None
    return Lamb


def build_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """SGD, AdamW or LAMB. LAMB keeps timm's defaults (betas (0.9, 0.999), eps 1e-6, the gradient's global norm
    clipped to 1, no trust ratio on parameters without weight decay), as RSB trained with them."""
    if cfg.optimizer == "lamb":
        kernels = {"foreach": cfg.optimizer_impl != "loop"} if cfg.optimizer_impl in ("foreach", "loop") else {}
        if cfg.optimizer_impl == "fused":
            raise ConfigError("optimizer_impl=fused: timm's LAMB has no fused kernel; use auto, foreach or loop")
        return lamb_class()(groups, lr=cfg.lr, **kernels)
    kernels = optimizer_kernels(cfg.optimizer_impl, device)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kernels)
    return torch.optim.AdamW(groups, lr=cfg.lr, **kernels)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The training loss of ``logits`` against class indices or soft targets (MixUp/CutMix).

    ``ce``: softmax cross-entropy with ``label_smoothing``. ``bce``: binary cross-entropy of each class
    against its target, averaged over classes and images as timm's ``BinaryCrossEntropy`` (RSB, Sec. 2.3);
    the targets are smoothed the same way (``t * (1 - eps) + eps / C``, which is what timm's MixUp hands it)
    and, with ``bce_target_thresh``, set to 1 above the threshold and 0 below.
    """
    if cfg.loss == "ce":
        return F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
    num_classes = logits.shape[1]
    dense = targets if targets.ndim == 2 else F.one_hot(targets, num_classes).to(logits.dtype)
    dense = dense * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
    if cfg.bce_target_thresh is not None:
        dense = (dense > cfg.bce_target_thresh).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, dense)


def prime_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give SGD parameters that start training mid-run (gradual unfreezing) a zero momentum buffer when
    the others of their group have one. With no dampening their first update is then exactly PyTorch's
    (a lazily created buffer starts as the gradient, ``0 * momentum + grad`` is the gradient), and fused
    SGD, which handles a group's buffers all at once, needs them all present or all absent."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if not group["momentum"] or group["dampening"]:
            continue
        state = optimizer.state  # a defaultdict: read with .get, so no empty entries appear
        if any(state.get(p, {}).get("momentum_buffer") is not None for p in group["params"]):
            for p in group["params"]:
                if p.requires_grad and state.get(p, {}).get("momentum_buffer") is None:
                    state[p]["momentum_buffer"] = torch.zeros_like(p)


class TrainHooks:
    """What trains, and at which learning rate, as a run goes: the engine's one extension point.

    The default trains every parameter at ``cfg.lr`` (``no_decay_norm_bias``/``no_decay_norm`` honoured). Fine-tuning
    strategies (``resnetlab.transfer``) override it to freeze parts, set per-part learning rates and
    unfreeze gradually; their state goes into the checkpoint so a resumed run continues the same plan.
    """

    kind = "train"

    def parameter_groups(self, model: ResNet, cfg: TrainConfig) -> list[dict[str, Any]]:
        """The optimizer's groups; include every parameter (frozen ones get no gradient and are skipped)."""
        return parameter_groups(model, cfg.lr, cfg.weight_decay, no_decay_norm_bias=cfg.no_decay_norm_bias,
                                no_decay_norm=cfg.no_decay_norm)  # fmt: skip

    def train_mode(self, model: ResNet, epoch: int) -> dict[str, Any]:
        """Put ``model`` in training mode for ``epoch``: called at the start of every epoch and after every
        evaluation (which leaves every module in train mode). May change ``requires_grad`` and module
        modes; returns what to record in the history rows of this epoch."""
        model.train()
        return {}

    def export_extra(self) -> dict[str, Any]:
        """Extra fields for the exported model's config.json."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved plan; a checkpoint of another kind of run is refused by name."""
        kind = state.get("kind", "train")
        if kind != self.kind:
            command = "resnetlab finetune --resume" if kind == "finetune" else "resnetlab train --resume"
            raise ConfigError(f"this checkpoint is of a {kind!r} run, not a {self.kind!r} one; resume it with "
                              f"{command} RUN_DIR")  # fmt: skip


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int, depth: int) -> int:
    """The warm-up's length in steps (``warmup_epochs`` or ``warmup_iters``; none for nets shallower than
    ``warmup_min_depth``)."""
    return (cfg.warmup_epochs * steps_per_epoch or cfg.warmup_iters) if depth >= cfg.warmup_min_depth else 0


def lr_factor(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int, depth: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step``: warm-up, then step decay, cosine or constant.

    ``schedule_unit: epoch`` evaluates the schedule at the epoch's index, so the lr is constant through each
    epoch (torchvision's reference steps its schedulers once per epoch). A linear warm-up goes from
    ``warmup_start`` (LinearLR's start factor) towards 1, or from 0 to 1 when it is None.
    """
    if cfg.schedule_unit == "epoch":
        step, total_steps, steps_per_epoch = step // steps_per_epoch, math.ceil(total_steps / steps_per_epoch), 1
    warmup = warmup_steps(cfg, steps_per_epoch, depth)
    if step < warmup:
        if cfg.warmup_lr is not None:
            return cfg.warmup_lr / cfg.lr
        if cfg.warmup_start is not None:
            return cfg.warmup_start + (1 - cfg.warmup_start) * step / warmup
        return (step + 1) / warmup
    if cfg.schedule == "step":
        scale = 1 if cfg.milestone_unit == "iter" else steps_per_epoch
        return cfg.gamma ** sum(step >= m * scale for m in cfg.milestones)
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


# ------------------------------------------------------------------------------------------ the loop
def _groups(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size``; an incomplete last list is left out."""
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint can be written."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # signals can only be handled in the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def find_checkpoint(run_dir_or_file: str | Path) -> Path:
    """The checkpoint to resume: a run folder's ``last.pt``, or the checkpoint file given."""
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = RunDir(path).last
    if not path.is_file():
        raise ConfigError(f"nothing to resume: {path} does not exist")
    return path


def auto_resume_target(cfg: TrainConfig | None) -> Path | None:
    """``cfg.run_dir`` when ``cfg.auto_resume`` is set and it holds a checkpoint (a restarted worker)."""
    if cfg is None or not cfg.auto_resume or not cfg.run_dir:
        return None
    path = Path(cfg.run_dir)
    return path if RunDir(path).last.is_file() else None


def saved_config(run_dir_or_checkpoint: str | Path) -> TrainConfig:
    """The config of a saved run (to change its ``RESUME_SAFE`` options before resuming it)."""
    path = find_checkpoint(run_dir_or_checkpoint)
    return resume_config(load_checkpoint(path)["config"], None, RunDir.of_checkpoint(path).path)


def data_note(data: str | None) -> str | None:
    """What the first load of a small-image archive does, said before it starts: it is decoded once into
    the dataset cache (CIFAR-10: about 17 s on 2 cores), where later runs read it in a second. None when
    the cache already holds it, or for other sources (the bundled digits, folders, named sets)."""
    if not data or not Path(data).expanduser().is_file():
        return None
    path = Path(data).expanduser()
    if cache_file_for(path, tag="mode=RGB").is_file():  # the tag build_data gives RGB images
        return None
    return (f"reading {data}: the first time, small images are decoded once into the dataset cache "
            f"{cache_dir() / 'datasets'} (CIFAR-10: about 20 s); later runs read the cache in a second")  # fmt: skip


def check_runnable(cfg: TrainConfig, *, fresh: bool) -> None:
    """Refuse the combinations that cannot run, before anything is built or written."""
    device, world = resolve_device(cfg.device, dist.local_rank()), dist.world_size()
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ConfigError("SyncBatchNorm needs CUDA GPUs; on CPU use --set model_options={norm_layer: groupnorm}")
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {world} process(es) times "
                          f"accum_steps {cfg.accum_steps}: each step is that many equal micro-batches")  # fmt: skip
    if cfg.compile and cfg.compile_mode == "reduce-overhead" and device.type != "cuda":
        raise ConfigError(f"compile_mode=reduce-overhead records CUDA graphs, which need a CUDA device (this run is "
                          f"on {device.type}); use --compile (default mode) here")  # fmt: skip
    if fresh and cfg.recipe == "finetune" and not cfg.pretrained:
        raise ConfigError(
            "the finetune recipe starts from pretrained weights: pass --pretrained (a weights tag such as "
            "tv_in1k, a weights file or a model folder), or use `resnetlab finetune --from SOURCE` (which also "
            "takes 'none' for the from-scratch baseline)"
        )


def train(
    cfg: TrainConfig | None,
    *,
    resume: str | Path | None = None,
    callbacks: list[Callable[[StepInfo], None]] | None = None,
    bundle: DataBundle | None = None,
    model: ResNet | None = None,
    hooks: TrainHooks | None = None,
    overwrite: bool = False,
    log_every: int = 0,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; see ``TrainConfig`` for every option.

    ``resume``: a run folder or checkpoint to continue. The run goes on with its saved config; ``cfg``
    (None: the saved one as is) may change only the ``RESUME_SAFE`` options (device, workers, progress,
    ...), any other difference is a ConfigError. ``callbacks`` are called after every optimizer step.
    ``bundle`` skips ``build_data`` (tests and studies). ``model``: a network to train instead of building
    ``cfg.model`` (fine-tuning's pretrained net with a new head; a resumed run rebuilds it from the
    checkpoint). ``hooks``: what trains at which lr as the run goes (``TrainHooks``).

    A new run refuses a ``cfg.run_dir`` that holds another run, unless ``overwrite`` (which removes that
    run's outputs) or ``cfg.auto_resume``; the folder is locked while the run writes it. ``log_every``:
    also log the training loss, lr and img/s every this many steps between evaluations (0: at evaluations).
    """
    if log_every < 0:
        raise ConfigError(f"log_every must be 0 (off) or a number of steps, got {log_every}")
    hooks = hooks or TrainHooks()
    resume = resume if resume is not None else auto_resume_target(cfg)
    if resume is not None:
        checkpoint_path = find_checkpoint(resume)
        rundir = RunDir.of_checkpoint(checkpoint_path)
        if model is not None:
            raise ConfigError("a resumed run rebuilds its model from the checkpoint; do not pass model=")
    elif cfg is None:
        raise ConfigError("train() needs a TrainConfig, or resume= naming a run to continue")
    else:
        check_runnable(cfg, fresh=model is None)
        rundir = RunDir(Path(cfg.run_dir)) if cfg.run_dir else RunDir.new(cfg.runs_root, cfg.model, cfg.data)
    dist.setup()
    try:  # only rank 0 writes the folder, so only it locks and claims it
        with rundir.lock() if dist.rank() == 0 else contextlib.nullcontext():
            state: dict[str, Any] | None = None
            if resume is not None:
                state = load_checkpoint(checkpoint_path)
                cfg = resume_config(state["config"], cfg, rundir.path)
                check_runnable(cfg, fresh=False)
                hooks.load_state_dict(state.get("hooks", {}))
            elif dist.rank() == 0:
                assert cfg is not None
                rundir.claim(overwrite=overwrite or cfg.auto_resume)  # auto_resume: the folder is this run's
            assert cfg is not None
            run = TrainRun(cfg, rundir, state=state, callbacks=callbacks or [], bundle=bundle, model=model,
                           hooks=hooks, log_every=log_every)  # fmt: skip
            return run.run()
    finally:
        dist.teardown()


class TrainRun:
    """One training run, from its config (and, resumed, its checkpoint) to the kept model.

    The constructor sets it up (execution path, data, model, optimizer, schedule, restored state);
    ``run`` walks the batches calling ``step`` on each, ``evaluate`` and ``checkpoint`` on their
    schedules, then ``finish`` exports the model. The loop's state (step, epoch, position, best, history)
    lives on the object, which everything reads; the caller's config is never changed.
    """

    def __init__(self, cfg: TrainConfig, rundir: RunDir, *, state: dict[str, Any] | None,
                 callbacks: list[Callable[[StepInfo], None]], bundle: DataBundle | None, model: ResNet | None,
                 hooks: TrainHooks, log_every: int = 0) -> None:  # fmt: skip
        self.rundir, self.callbacks, self.hooks, self.log_every = rundir, callbacks, hooks, log_every
        self.cfg = cfg = dataclasses.replace(cfg, run_dir=str(rundir.path))
        self.world, self.is_main = dist.world_size(), dist.rank() == 0
        self.plan = ExecutionPlan.resolve(device=cfg.device, amp=cfg.amp, channels_last=cfg.channels_last,
                                          compile=cfg.compile, compile_mode=cfg.compile_mode,
                                          local_rank=dist.local_rank())  # fmt: skip
        self.device = self.plan.device
        self.logger = MetricsLogger(rundir, cfg, enabled=self.is_main, resume=state is not None)
        self.logger.log_text(self.plan.describe())
        self._seed()
        self.bundle = self._data(bundle)
        self.raw_model = self._model(state, model)
        self.train_model, self.trains = self._wrap(), [p.requires_grad for p in self.raw_model.parameters()]
        self._schedule()
        self._position(state)
        self.eval_model = self.ema.module if self.ema is not None else self.raw_model
        self.eval_workers = workers_for(self.eval_set, cfg.num_workers)
        self.eval_every = cfg.eval_every or self.steps_per_epoch
        self.checkpoint_every = cfg.checkpoint_every or self.steps_per_epoch
        self.mix = None
        if cfg.mixup_alpha or cfg.cutmix_alpha:
            self.mix = self.bundle.mixup_cutmix(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha)
        self.running = self._fresh_running()
        self.start_time, self.images_seen = time.perf_counter(), 0
        self.throughput = Throughput()
        epochs = f"{self.epochs} epoch{'s' if self.epochs > 1 else ''} of {self.steps_per_epoch} steps"
        self.logger.log_text(f"run directory: {rundir.path}; {self.total_steps} steps ({epochs})")

    # ------------------------------------------------------------------------------------ set-up
    def _seed(self) -> None:
        """Seed the global RNGs (the model's initialisation draws from torch's; timm's RandAugment, run in the
        main process when num_workers is 0, from Python's and NumPy's) and pick the kernels' modes."""
        cfg, device = self.cfg, self.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.cuda_graphs = cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and device.type == "cuda"

    def _data(self, bundle: DataBundle | None) -> DataBundle:
        """The given bundle or ``cfg.data`` loaded (saying so when its first decode takes a while); the
        split the run evaluates on: val when there is one, else test."""
        cfg = self.cfg
        if bundle is None and (note := data_note(cfg.data)):
            self.logger.log_text(note)
        bundle = bundle or build_data(
            cfg.data, augment=cfg.augment, image_size=cfg.image_size, val_split=cfg.val_split, seed=cfg.seed,
            download=cfg.download, mean=cfg.mean, std=cfg.std, auto_augment=cfg.auto_augment,
            random_erasing=cfg.random_erasing, eval_image_size=cfg.eval_image_size, interpolation=cfg.interpolation,
            crop_pct=eval_crop_pct(cfg, cfg.eval_image_size or cfg.image_size) if cfg.eval_resize else None,
        )  # fmt: skip
        if bundle.num_classes < 2:
            raise DataError(f"{bundle.name} has {bundle.num_classes} class ({', '.join(bundle.classes)}): a "
                            "classifier needs at least 2; add a folder for each other class")  # fmt: skip
        self.has_val = bundle.val is not None
        self.eval_set, self.eval_split = (bundle.val, "val") if self.has_val else (bundle.test, "test")
        return bundle

    def _model(self, state: dict[str, Any] | None, model: ResNet | None) -> ResNet:
        """The network on its device and in its memory format: the checkpoint's architecture when resumed
        (its weights are restored later), else ``model`` or ``cfg.model`` built for the data."""
        if state is not None:
            raw = ResNet(ResNetConfig.from_dict(state["model_config"]), name=state["architecture"])
        else:
            raw = model if model is not None else build_model(self.cfg, self.bundle)
        if self.cfg.sync_bn and self.world > 1:
            raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
        raw.to(self.device)
        if self.plan.channels_last:
            raw.to(memory_format=torch.channels_last)
        return raw

    def _schedule(self) -> None:
        """The batches, the run's length in steps, and the optimizer, lr schedule, AMP scaler and EMA."""
        cfg, raw, device = self.cfg, self.raw_model, self.device
        self.batches = TrainBatches(cfg, self.bundle, device, cfg.batch_size // (self.world * cfg.accum_steps))
        # an optimizer step is accum_steps micro-batches; an epoch's last incomplete group is left out
        self.steps_per_epoch = steps_per_epoch = len(self.batches) // cfg.accum_steps
        if steps_per_epoch == 0:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(self.bundle.train)} training "
                              "images (an epoch's share of them, with repeated_aug)")  # fmt: skip
        self.total_steps = total_steps = cfg.max_iters or cfg.epochs * steps_per_epoch
        self.epochs = epoch_of(total_steps, steps_per_epoch)
        depth = raw.config.depth
        self.warmup_steps = warmup_steps(cfg, steps_per_epoch, depth)
        self.optimizer = build_optimizer(cfg, self.hooks.parameter_groups(raw, cfg), device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s, total_steps, steps_per_epoch, depth)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.plan.amp_dtype == torch.float16)
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema = torch.optim.swa_utils.AveragedModel(
                raw, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
            )

    def _position(self, state: dict[str, Any] | None) -> None:
        """Where the run stands: the start, or everything the checkpoint ``state`` saved."""
        if self.is_main:
            self.rundir.remove_stale_temporaries()
        self.step, self.epoch, self.batch_in_epoch, self.best = 0, 0, 0, -1.0
        self.history: list[dict[str, Any]] = []
        self.seconds_before, self.images_before = 0.0, 0  # of the sessions before a resume
        if state is not None:
            self._restore(state)
        else:
            self.logger.log_text(f"data: {self.bundle.summary()}")
        self.saved_step = self.step if state is not None else None  # the step last.pt holds

    def _wrap(self) -> nn.Module:
        """What the steps run: DDP around the model under torchrun (it registers the parameters that
        train: rebuilt when the hooks change them), compiled when asked."""
        wrapped: nn.Module = self.raw_model
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if self.world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            wrapped = self.ddp = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids)
        if not self.cfg.compile:
            return wrapped
        return torch.compile(wrapped, mode=None if self.cfg.compile_mode == "default" else self.cfg.compile_mode)

    def _restore(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best, self.history = state["best"], list(state["history"])
        self.seconds_before, self.images_before = float(state.get("seconds", 0.0)), int(state.get("images_seen", 0))
        set_rng_state(state["rng"])

    @staticmethod
    def _fresh_running() -> dict[str, Any]:
        return {"loss": 0.0, "correct": 0, "count": 0}

    def enter_train_mode(self) -> dict[str, Any]:
        """The hooks' training mode for this epoch; when they changed what trains, prime the momentum of
        the newly trained parameters and (under torchrun) rewrap the model."""
        info = self.hooks.train_mode(self.raw_model, self.epoch)
        now = [p.requires_grad for p in self.raw_model.parameters()]
        if now != self.trains:
            prime_momentum(self.optimizer)
            if self.world > 1:
                self.train_model = self._wrap()
        self.trains = now
        return info

    # ------------------------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train to ``total_steps``; SIGINT/SIGTERM save a checkpoint and raise ``TrainingInterrupted``."""
        progress = RunProgress(self.step, self.total_steps, self.steps_per_epoch, self.cfg.progress and self.is_main)
        try:
            with _StopSignal() as stop:
                while self.step < self.total_steps:
                    self.train_epoch(progress, stop)
                    dist.barrier()
        finally:
            progress.close()
        return self.finish()

    def train_epoch(self, progress: RunProgress, stop: _StopSignal) -> None:
        """The rest of the current epoch (or of the run, when it ends first)."""
        plan = self.enter_train_mode()
        micro = self.batches.epoch(self.epoch, self.batch_in_epoch * self.cfg.accum_steps)
        for group in _groups(micro, self.cfg.accum_steps):
            loss, lr = self.step_on(group)
            progress.update(self.step, loss, self.running, lr, self.throughput.rate())
            epoch_done = self.batch_in_epoch == self.steps_per_epoch
            if epoch_done:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            finished = self.step >= self.total_steps
            if self.step % self.eval_every == 0 or finished:
                with self.throughput.paused():
                    self.evaluate(plan, lr, progress)
            elif self.log_every and self.step % self.log_every == 0:
                self.history.append(self._record(lr, None))
            if self.step % self.checkpoint_every == 0 or finished or epoch_done:
                with self.throughput.paused():
                    self.checkpoint("last")
            if stop.received is not None:
                self.checkpoint("last")
                raise TrainingInterrupted(
                    f"stopped by signal {stop.received} at step {self.step}; checkpoint saved. Resume with: "
                    f"resnetlab train --resume {self.rundir.path}"
                )
            if finished or epoch_done:
                break

    def step_on(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step on the equal-sized ``micro_batches`` ``[(x, y), ...]`` (``accum_steps`` of them in
        a run): their gradients add up, each loss weighted by ``1 / len(micro_batches)``, so the update is the
        one a single batch of all of them would give (up to batch statistics); under DDP the gradients are
        all-reduced once, on the last. Returns the mean loss and the lr the step used."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for index, (x, y) in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                losses.append(self._accumulate(x, y, len(micro_batches)))
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None and self.batch_in_epoch % cfg.ema_every == 0:
            self.ema.update_parameters(self.raw_model)
            if self.step < self.warmup_steps:  # during the warm-up the EMA copies the weights (torchvision)
                self.ema.n_averaged.zero_()
        self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
        images = sum(len(x) for x, _ in micro_batches) * self.world
        self.images_seen += images
        self.throughput.add(images)
        loss_value = sum(losses) / len(losses)
        lr = self.optimizer.param_groups[0]["lr"]
        for callback in self.callbacks:
            callback(StepInfo(self.step, self.epoch, loss_value, lr, self.raw_model, self.total_steps))
        return loss_value, lr

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor, parts: int) -> float:
        """Forward and backward on one micro-batch, its loss scaled by ``1 / parts``; returns its loss."""
        plan = self.plan
        if self.cuda_graphs:  # a new iteration: the graphs' previous outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if plan.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = y
        if self.mix is not None:
            x, targets = self.mix(x, y)
        autocast = torch.autocast(
            self.device.type, dtype=plan.amp_dtype or torch.float32, enabled=plan.amp_dtype is not None
        )
        with autocast:
            logits = self.train_model(x)
            loss = classification_loss(logits.float(), targets, self.cfg)
        if not torch.isfinite(loss):
            raise self._diverged(loss.item())
        self.scaler.scale(loss / parts).backward()
        loss_value = loss.item()
        self.running["loss"] += loss_value * len(y)
        self.running["correct"] += int((logits.argmax(1) == y).sum())
        self.running["count"] += len(y)
        return loss_value

    def _diverged(self, loss: float) -> TrainingDiverged:
        if self.saved_step is not None:
            kept = f"The last good checkpoint is {self.rundir.last} (step {self.saved_step})."
        else:
            first = min(self.checkpoint_every, self.steps_per_epoch, self.total_steps)
            kept = f"No checkpoint was written yet (the first was due at step {first}), so there is nothing to resume."
        return TrainingDiverged(f"the loss became {loss} at step {self.step} (epoch {self.epoch}); stopped. {kept} "
                                "Try a lower --lr, --grad-clip, or --amp off")  # fmt: skip

    def _record(self, lr: float, result: dict[str, Any] | None) -> dict[str, Any]:
        """A metrics row of the training since the previous row (and ``result``); starts a new interval."""
        row = self.logger.record(self.step, epoch_of(self.step, self.steps_per_epoch), lr, self.running, result,
                                 self.throughput.rate(), total_steps=self.total_steps, epochs=self.epochs,
                                 split=self.eval_split)  # fmt: skip
        self.running = self._fresh_running()
        self.throughput.reset()
        return row

    def evaluate(self, plan: dict[str, Any], lr: float, progress: RunProgress) -> None:
        """Evaluate on val (else test), record the row, and keep ``best.pt`` when choosing on val."""
        result = None
        if self.is_main and self.eval_set is not None:
            progress.note(f"evaluating on {len(self.eval_set)} {self.eval_split} images")
            result = self._evaluate(self.eval_model, self.eval_set)
        self.history.append({**self._record(lr, result), **plan})
        self.enter_train_mode()  # evaluate() left every module in train mode
        if result is not None and result["top1"] > self.best:
            self.best = result["top1"]
            if self.has_val:  # choosing on the test set would be tuning on it: no best.pt then
                self.checkpoint("best")
        progress.set_eval(result, self.eval_split)

    def _evaluate(self, model: nn.Module, dataset: Any, progress: str | None = None) -> dict[str, Any]:
        return evaluate(model, dataset, self.device, amp_dtype=self.plan.amp_dtype, num_workers=self.eval_workers,
                        num_classes=self.bundle.num_classes, progress=progress)  # fmt: skip

    def checkpoint(self, name: str) -> None:
        """Write ``checkpoints/<name>.pt`` (rank 0), atomically."""
        if self.is_main:
            save_checkpoint(self.rundir.checkpoint(name), self.state_dict())
        if name == "last":
            self.saved_step = self.step

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-identically."""
        return {
            "config": self.cfg.to_dict(), "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "best": self.best,
            "history": self.history, "rng": rng_state(), "model_config": self.raw_model.config.to_dict(),
            "architecture": self.raw_model.name, "seconds": self.seconds(), "images_seen": self.images_total(),
            "hooks": self.hooks.state_dict(),
        }  # fmt: skip

    def seconds(self) -> float:
        """Wall time of the run, over all its sessions."""
        return self.seconds_before + time.perf_counter() - self.start_time

    def images_total(self) -> int:
        return self.images_before + self.images_seen

    # ------------------------------------------------------------------------------------ the end
    def finish(self) -> TrainResult:
        """Export the kept model, draw the curves, grade on the test set once (when chosen on val)."""
        seconds = self.seconds()
        evals = [h for h in self.history if "eval_top1" in h]
        final = evals[-1]["eval_top1"] if evals else float("nan")
        test_accuracy, selected = None, "best-val" if self.has_val else "final"
        if self.is_main:
            exported = save_run_model(self.cfg, self.rundir, self.state_dict(), use_ema=self.ema is not None,
                                      from_best=self.has_val, best=self.best,
                                      extra=self.hooks.export_extra())  # fmt: skip
            title = f"{self.raw_model.name} on {self.bundle.name}: {self.eval_split} split"
            plot_curves(self.history, self.rundir.curves, title=title, split=self.eval_split)
            if self.has_val:
                done = f"done: best val top-1 {self.best:.2f}% (the exported model), final {final:.2f}%"
                if self.bundle.test is not None:  # selected on val: graded on the test set once
                    text = f"grading the exported model on the {len(self.bundle.test)} test images"
                    self.logger.log_text(text)
                    test_accuracy = self._evaluate(exported.to(self.device), self.bundle.test,
                                                   progress=text if self.cfg.progress else None)["top1"]  # fmt: skip
                    done += f"; on the test set: top-1 {test_accuracy:.2f}%"
            elif evals:
                test_accuracy = final
                done = (f"done: test top-1 of the final model {final:.2f}% (the exported model; peak during "
                        f"training {self.best:.2f}%, not used to choose: that would tune on the test set)")  # fmt: skip
            else:
                done = (f"done: {self.bundle.name} has no test split and no val split, so the model was not "
                        "evaluated; hold out part of train with --val-split 0.1")  # fmt: skip
            self.logger.log_text(f"{done}; model saved to {self.rundir.model}")
        self.logger.close()
        return TrainResult(self.rundir.path, self.raw_model, self.step, self.epoch, self.history, self.best, final,
                           self.rundir.model, seconds, self.images_total() / max(seconds, 1e-9), test_accuracy,
                           selected)  # fmt: skip


def save_run_model(cfg: TrainConfig, rundir: RunDir, current: dict[str, Any], *, use_ema: bool, from_best: bool,
                   best: float, extra: dict[str, Any] | None = None) -> ResNet:  # fmt: skip
    """Save the run's kept model as a ``save_pretrained`` folder (``rundir.model``) and return it: the best
    checkpoint's weights (``from_best``: chosen on a val split) or the current ones, EMA weights when kept."""
    source = load_checkpoint(rundir.best) if from_best and rundir.best.is_file() else current
    weights = source["model"]
    if use_ema and source.get("ema"):
        weights = {k.removeprefix("module."): v for k, v in source["ema"].items() if k.startswith("module.")}
    model = ResNet(ResNetConfig.from_dict(source["model_config"]), name=source["architecture"])
    model.load_state_dict(weights)
    save_pretrained(model, rundir.model, extra={"trained_with": cfg.to_dict(), "best_top1": best, **(extra or {})})
    return model
