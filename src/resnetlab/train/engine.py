"""``train(config)``: the training engine behind ``resnetlab train``, on one device or many (torchrun).

The loop counts optimizer steps; epochs are how the data is walked. Everything a resumed run needs is in
the checkpoint (model, optimizer, schedule, AMP scaler, EMA, RNG states, epoch and batch position), so a
run killed at any point and resumed ends with the same weights as an uninterrupted one (in deterministic
mode, with device-resident data or ``num_workers=0``).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from resnetlab.data import DataBundle, TensorImageDataset, build_data
from resnetlab.data.device import DeviceBatches, epoch_order
from resnetlab.errors import ConfigError, ResNetLabError
from resnetlab.models import ResNet, ResNetConfig, create_model, save_pretrained
from resnetlab.train import distributed as dist
from resnetlab.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from resnetlab.train.config import CUDA_GRAPH_MODES, TrainConfig, resume_config
from resnetlab.train.metrics import MetricsLogger, accuracy_counts, plot_curves
from resnetlab.train.params import parameter_groups


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

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir), "model_dir": str(self.model_dir), "steps": self.steps,
            "epochs": self.epochs, "best_accuracy": self.best_accuracy, "final_accuracy": self.final_accuracy,
            "test_accuracy": self.test_accuracy, "selected": self.selected, "seconds": round(self.seconds, 2),
            "images_per_second": round(self.images_per_second, 1),
        }  # fmt: skip


# ------------------------------------------------------------------------------------------ set-up
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA GPU is visible; use --device cpu")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def build_model(cfg: TrainConfig, bundle: DataBundle) -> ResNet:
    """The model for this data: its head, input channels and preprocessing follow the dataset."""
    size = bundle.image_size
    model = create_model(
        cfg.model, cfg.pretrained, num_classes=bundle.num_classes, in_chans=bundle.in_chans,
        input_size=(bundle.in_chans, size, size), mean=tuple(bundle.mean), std=tuple(bundle.std),
        crop_pct=1.0 if size <= 64 else 0.875, label_names=tuple(bundle.classes), **cfg.model_options,
    )  # fmt: skip
    assert isinstance(model, ResNet)
    return model


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


def build_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    kernels = optimizer_kernels(cfg.optimizer_impl, device)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kernels)
    return torch.optim.AdamW(groups, lr=cfg.lr, **kernels)


class TrainHooks:
    """What trains, and at which learning rate, as a run goes: the engine's one extension point.

    The default trains every parameter at ``cfg.lr`` (``no_decay_norm_bias`` honoured). Fine-tuning
    strategies (``resnetlab.transfer``) override it to freeze parts, set per-part learning rates and
    unfreeze gradually; their state goes into the checkpoint so a resumed run continues the same plan.
    """

    kind = "train"

    def parameter_groups(self, model: ResNet, cfg: TrainConfig) -> list[dict[str, Any]]:
        """The optimizer's groups; include every parameter (frozen ones get no gradient and are skipped)."""
        return parameter_groups(model, cfg.lr, cfg.weight_decay, no_decay_norm_bias=cfg.no_decay_norm_bias)

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


def lr_factor(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int, depth: int) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: warm-up, then step decay, cosine or constant."""
    warmup = cfg.warmup_iters if depth >= cfg.warmup_min_depth else 0
    if step < warmup:
        return cfg.warmup_lr / cfg.lr if cfg.warmup_lr is not None else (step + 1) / warmup
    if cfg.schedule == "step":
        scale = 1 if cfg.milestone_unit == "iter" else steps_per_epoch
        return cfg.gamma ** sum(step >= m * scale for m in cfg.milestones)
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded across ranks like DistributedSampler, that can start
    part-way through an epoch (for exact resumption)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def indices(self) -> list[int]:
        return epoch_order(self.n, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch, rank=self.rank,
                           world_size=self.world_size).tolist()  # fmt: skip

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return len(self.indices()) - self.start


class TrainBatches:
    """The training split as batches: device-resident for in-memory datasets, a DataLoader otherwise."""

    def __init__(self, cfg: TrainConfig, bundle: DataBundle, device: torch.device, per_rank_batch: int) -> None:
        self.device = device
        self.per_rank_batch = per_rank_batch
        train = bundle.train
        rank, world = dist.rank(), dist.world_size()
        self.on_device = (
            cfg.data_on_device and isinstance(train, TensorImageDataset) and bundle.augment in ("cifar", "none")
            and not cfg.auto_augment and not cfg.random_erasing
        )  # fmt: skip
        if self.on_device:
            self.batches = DeviceBatches(
                train, per_rank_batch, mean=bundle.mean, std=bundle.std, device=device,
                augment=bundle.augment == "cifar", shuffle=True, padding=bundle.image_size // 8,
                hflip=bundle.hflip, drop_last=True, seed=cfg.seed, rank=rank, world_size=world,
            )  # fmt: skip
            return
        self.sampler = EpochSampler(len(train), shuffle=True, seed=cfg.seed, rank=rank, world_size=world)
        # The loader's own generator seeds its workers, so creating it mid-epoch on resume draws nothing
        # from the global RNG that the uninterrupted run would not have drawn.
        self.generator, self.seed = torch.Generator(), cfg.seed
        self.loader = DataLoader(
            train, batch_size=per_rank_batch, sampler=self.sampler, drop_last=True,
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda", generator=self.generator,
        )  # fmt: skip

    def __len__(self) -> int:
        if self.on_device:
            return len(self.batches)
        return len(self.sampler.indices()) // self.per_rank_batch

    def epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.on_device:
            self.batches.set_epoch(epoch)
            yield from self.batches.iter_from(start_batch)
            return
        self.sampler.epoch, self.sampler.start = epoch, start_batch * self.per_rank_batch
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# ------------------------------------------------------------------------------------------ evaluation
def workers_for(dataset: Any, num_workers: int) -> int:
    """DataLoader workers for evaluating ``dataset``: none for in-memory sets (starting workers costs more
    than their transforms), ``num_workers`` for images decoded per item."""
    return 0 if isinstance(dataset, TensorImageDataset) else num_workers


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Loss, top-1 and top-5 accuracy and the confusion matrix of ``model`` on ``dataset``.

    Ten-crop items ``(10, C, H, W)`` are averaged over their crops.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    n_classes = num_classes or len(getattr(dataset, "classes", [])) or 0
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    total, loss_sum, top1, top5 = 0, 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        crops = x.shape[1] if x.ndim == 5 else 0
        if crops:
            x = x.flatten(0, 1)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x).float()
        if crops:
            logits = logits.view(-1, crops, logits.shape[-1]).mean(1)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        c1, c5 = accuracy_counts(logits, y)
        top1, top5, total = top1 + c1, top5 + c5, total + len(y)
        if n_classes:
            pairs = y.cpu() * n_classes + logits.argmax(1).cpu()
            confusion += torch.bincount(pairs, minlength=n_classes**2).view(n_classes, n_classes)
    model.train(was_training)
    total = max(total, 1)
    return {"loss": loss_sum / total, "top1": 100 * top1 / total, "top5": 100 * top5 / total,
            "count": total, "confusion": confusion}  # fmt: skip


# ------------------------------------------------------------------------------------------ the loop
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


def new_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = Path(cfg.data).name.split(".")[0] if cfg.data else "digits"
    path, suffix = Path(cfg.runs_root) / f"{stamp}-{cfg.model}-{data}", 1
    while path.exists():
        suffix += 1
        path = Path(cfg.runs_root) / f"{stamp}-{cfg.model}-{data}-{suffix}"
    return path


def find_checkpoint(run_dir_or_file: str | Path) -> Path:
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise ConfigError(f"nothing to resume: {path} does not exist")
    return path


def auto_resume_target(cfg: TrainConfig | None) -> Path | None:
    """``cfg.run_dir`` when ``cfg.auto_resume`` is set and it holds a checkpoint (a restarted worker)."""
    if cfg is None or not cfg.auto_resume or not cfg.run_dir:
        return None
    path = Path(cfg.run_dir)
    return path if (path / "checkpoints" / "last.pt").is_file() else None


def saved_config(run_dir_or_checkpoint: str | Path) -> TrainConfig:
    """The config of a saved run (to change its ``RESUME_SAFE`` options before resuming it)."""
    path = find_checkpoint(run_dir_or_checkpoint)
    return resume_config(load_checkpoint(path)["config"], None, path.parent.parent)


def train(
    cfg: TrainConfig | None,
    *,
    resume: str | Path | None = None,
    callbacks: list[Callable[[StepInfo], None]] | None = None,
    bundle: DataBundle | None = None,
    model: ResNet | None = None,
    hooks: TrainHooks | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; see ``TrainConfig`` for every option.

    ``resume``: a run folder or checkpoint to continue. The run goes on with its saved config; ``cfg``
    (None: the saved one as is) may change only the ``RESUME_SAFE`` options (device, workers, progress,
    ...), any other difference is a ConfigError. ``callbacks`` are called after every optimizer step.
    ``bundle`` skips ``build_data`` (tests and studies). ``model``: a network to train instead of building
    ``cfg.model`` (fine-tuning's pretrained net with a new head; a resumed run rebuilds it from the
    checkpoint). ``hooks``: what trains at which lr as the run goes (``TrainHooks``).
    """
    hooks = hooks or TrainHooks()
    state: dict[str, Any] | None = None
    resume = resume if resume is not None else auto_resume_target(cfg)
    if resume is not None:
        checkpoint_path = find_checkpoint(resume)
        state = load_checkpoint(checkpoint_path)
        cfg = resume_config(state["config"], cfg, checkpoint_path.parent.parent)
        hooks.load_state_dict(state.get("hooks", {}))
        if model is not None:
            raise ConfigError("a resumed run rebuilds its model from the checkpoint; do not pass model=")
    elif cfg is None:
        raise ConfigError("train() needs a TrainConfig, or resume= naming a run to continue")
    dist.setup()
    try:
        return _train(cfg, state, callbacks or [], bundle, model, hooks)
    finally:
        dist.teardown()


def _train(
    cfg: TrainConfig, state: dict[str, Any] | None, callbacks: list[Callable[[StepInfo], None]],
    bundle: DataBundle | None, given_model: ResNet | None, hooks: TrainHooks,
) -> TrainResult:  # fmt: skip
    rank, world = dist.rank(), dist.world_size()
    is_main = rank == 0
    device = resolve_device(cfg.device, dist.local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ConfigError("SyncBatchNorm needs CUDA GPUs; on CPU use --set model_options={norm_layer: groupnorm}")
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    cuda_graphs = cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and device.type == "cuda"
    if cfg.compile and cfg.compile_mode == "reduce-overhead" and device.type != "cuda":
        raise ConfigError(f"compile_mode=reduce-overhead records CUDA graphs, which need a CUDA device (this run "
                          f"is on {device.type}); use --compile (default mode) here")  # fmt: skip
    if state is None and given_model is None and cfg.recipe == "finetune" and not cfg.pretrained:
        raise ConfigError(
            "the finetune recipe starts from pretrained weights: pass --pretrained (a weights tag such as "
            "tv_in1k, a weights file or a model folder), or use `resnetlab finetune --from SOURCE` (which also "
            "takes 'none' for the from-scratch baseline)"
        )

    bundle = bundle or build_data(
        cfg.data, augment=cfg.augment, image_size=cfg.image_size, val_split=cfg.val_split, seed=cfg.seed,
        download=cfg.download, mean=cfg.mean, std=cfg.std, auto_augment=cfg.auto_augment,
        random_erasing=cfg.random_erasing,
    )  # fmt: skip
    has_val = bundle.val is not None
    eval_set = bundle.val if has_val else bundle.test
    if state is not None:  # the saved architecture; its weights come from the checkpoint, not cfg.pretrained
        model = ResNet(ResNetConfig.from_dict(state["model_config"]), name=state["architecture"])
    else:
        model = given_model if given_model is not None else build_model(cfg, bundle)
    depth = model.config.depth
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    raw_model = model

    def wrap(model: ResNet) -> nn.Module:
        """What the steps run: DDP around the model under torchrun (it registers the parameters that
        train: rebuilt when the hooks change them), compiled when asked."""
        wrapped: nn.Module = model
        if world > 1:
            ids = [device] if device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if not cfg.compile:
            return wrapped
        return torch.compile(wrapped, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)

    train_model, trains = wrap(raw_model), [p.requires_grad for p in raw_model.parameters()]

    def enter_train_mode() -> dict[str, Any]:
        nonlocal train_model, trains
        info = hooks.train_mode(raw_model, epoch)
        now = [p.requires_grad for p in raw_model.parameters()]
        if now != trains and world > 1:
            train_model = wrap(raw_model)
        trains = now
        return info

    batches = TrainBatches(cfg, bundle, device, cfg.batch_size // world)
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(bundle.train)} training images")
    total_steps = cfg.max_iters or cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)

    optimizer = build_optimizer(cfg, hooks.parameter_groups(raw_model, cfg), device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg, s, total_steps, steps_per_epoch, depth)
    )
    amp_dtype = autocast_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = None
    if cfg.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            raw_model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
        )

    run_dir = Path(cfg.run_dir) if cfg.run_dir else new_run_dir(cfg)
    cfg.run_dir = str(run_dir)
    last_path = run_dir / "checkpoints" / "last.pt"
    if is_main:  # temporary files of checkpoint writes that a killed run left behind
        for stale in (run_dir / "checkpoints").glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
    step, epoch, batch_in_epoch, best, history = 0, 0, 0, -1.0, []
    seconds_before, images_before = 0.0, 0  # of the sessions before a resume
    if state is not None:
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        best, history = state["best"], list(state["history"])
        seconds_before, images_before = float(state.get("seconds", 0.0)), int(state.get("images_seen", 0))
        set_rng_state(state["rng"])
    saved_step = step if state is not None else None  # the step last.pt holds
    logger = MetricsLogger(run_dir, cfg, enabled=is_main, resume=state is not None)
    if state is None:
        logger.log_text(f"data: {bundle.summary()}")
    start_time, images_seen = time.perf_counter(), 0

    def checkpoint_state() -> dict[str, Any]:
        return {
            "config": cfg.to_dict(), "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "step": step, "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "best": best, "history": history, "rng": rng_state(),
            "model_config": raw_model.config.to_dict(), "architecture": raw_model.name,
            "seconds": seconds_before + time.perf_counter() - start_time, "images_seen": images_before + images_seen,
            "hooks": hooks.state_dict(),
        }  # fmt: skip

    def save(name: str) -> None:
        nonlocal saved_step
        if is_main:
            save_checkpoint(run_dir / "checkpoints" / name, checkpoint_state())
        if name == "last.pt":
            saved_step = step

    eval_model = ema.module if ema is not None else raw_model
    eval_workers = workers_for(eval_set, cfg.num_workers)
    eval_every = cfg.eval_every or steps_per_epoch
    checkpoint_every = cfg.checkpoint_every or steps_per_epoch
    mix = None
    if cfg.mixup_alpha or cfg.cutmix_alpha:
        mix = bundle.mixup_cutmix(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha)
    running = {"loss": 0.0, "correct": 0, "count": 0}
    logger.log_text(f"run directory: {run_dir}; {total_steps} steps, {steps_per_epoch} per epoch, device {device}")

    with _StopSignal() as stop:
        while step < total_steps:
            progress = logger.progress(epoch, epochs, steps_per_epoch, batch_in_epoch, cfg.progress and is_main)
            plan = enter_train_mode()
            for x, y in batches.epoch(epoch, batch_in_epoch):
                if cuda_graphs:  # a new iteration: the graphs' previous outputs may be overwritten
                    torch.compiler.cudagraph_mark_step_begin()
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                targets = y
                if mix is not None:
                    x, targets = mix(x, y)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    logits = train_model(x)
                    loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
                if not torch.isfinite(loss):
                    progress.close()
                    if saved_step is not None:
                        kept = f"The last good checkpoint is {last_path} (step {saved_step})."
                    else:
                        kept = (f"No checkpoint was written yet (the first was due at step "
                                f"{min(checkpoint_every, steps_per_epoch, total_steps)}), so there is nothing to "
                                "resume.")  # fmt: skip
                    raise TrainingDiverged(
                        f"the loss became {loss.item()} at step {step} (epoch {epoch}); stopped. {kept} Try a "
                        "lower --lr, --grad-clip, or --amp off"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(raw_model)
                step, batch_in_epoch = step + 1, batch_in_epoch + 1
                images_seen += len(x) * world
                loss_value = loss.item()
                running["loss"] += loss_value * len(y)
                running["correct"] += int((logits.argmax(1) == y).sum())
                running["count"] += len(y)
                lr = optimizer.param_groups[0]["lr"]
                speed = images_seen / (time.perf_counter() - start_time)
                progress.update(loss_value, running, lr, speed)
                for callback in callbacks:
                    callback(StepInfo(step, epoch, loss_value, lr, raw_model, total_steps))
                epoch_done = batch_in_epoch == steps_per_epoch
                if epoch_done:
                    epoch, batch_in_epoch = epoch + 1, 0
                finished = step >= total_steps
                if step % eval_every == 0 or finished:
                    result = None
                    if is_main and eval_set is not None:
                        result = evaluate(eval_model, eval_set, device, amp_dtype=amp_dtype, num_workers=eval_workers,
                                          num_classes=bundle.num_classes)  # fmt: skip
                    history.append({**logger.record(step, epoch, lr, running, result, speed), **plan})
                    running = {"loss": 0.0, "correct": 0, "count": 0}
                    enter_train_mode()  # evaluate() left every module in train mode
                    if result is not None and result["top1"] > best:
                        best = result["top1"]
                        if has_val:  # choosing on the test set would be tuning on it: no best.pt then
                            save("best.pt")
                    progress.set_eval(result)
                if step % checkpoint_every == 0 or finished or epoch_done:
                    save("last.pt")
                if stop.received is not None:
                    save("last.pt")
                    progress.close()
                    raise TrainingInterrupted(
                        f"stopped by signal {stop.received} at step {step}; checkpoint saved. Resume with: "
                        f"resnetlab train --resume {run_dir}"
                    )
                if finished or epoch_done:
                    break
            progress.close()
            dist.barrier()

    seconds = seconds_before + time.perf_counter() - start_time
    images_total = images_before + images_seen
    model_dir = run_dir / "model"
    final = history[-1].get("eval_top1", float("nan")) if history else float("nan")
    test_accuracy, selected = None, "best-val" if has_val else "final"
    if is_main:
        exported = export_model(cfg, run_dir, model_dir, checkpoint_state(), use_ema=ema is not None,
                                from_best=has_val, best=best, extra=hooks.export_extra())  # fmt: skip
        plot_curves(history, run_dir / "curves.png")
        if has_val:
            done = f"done: best val top-1 {best:.2f}% (the exported model), final {final:.2f}%"
            if bundle.test is not None:  # selected on val: graded on the test set once
                test_accuracy = evaluate(exported.to(device), bundle.test, device, amp_dtype=amp_dtype,
                                         num_workers=eval_workers, num_classes=bundle.num_classes)["top1"]  # fmt: skip
                done += f"; on the test set: top-1 {test_accuracy:.2f}%"
        else:
            test_accuracy = final if bundle.test is not None else None
            done = (f"done: test top-1 of the final model {final:.2f}% (the exported model; peak during training "
                    f"{best:.2f}%, not used to choose: that would tune on the test set)")  # fmt: skip
        logger.log_text(f"{done}; model saved to {model_dir}")
    logger.close()
    return TrainResult(run_dir, raw_model, step, epoch, history, best, final, model_dir, seconds,
                       images_total / max(seconds, 1e-9), test_accuracy, selected)  # fmt: skip


def export_model(cfg: TrainConfig, run_dir: Path, model_dir: Path, current: dict[str, Any], *, use_ema: bool,
                 from_best: bool, best: float, extra: dict[str, Any] | None = None) -> ResNet:  # fmt: skip
    """Save the run's model as a ``save_pretrained`` folder and return it: the best checkpoint's weights
    (``from_best``: chosen on a val split) or the current ones, EMA weights when kept."""
    best_path = run_dir / "checkpoints" / "best.pt"
    source = load_checkpoint(best_path) if from_best and best_path.is_file() else current
    weights = source["model"]
    if use_ema and source.get("ema"):
        weights = {k.removeprefix("module."): v for k, v in source["ema"].items() if k.startswith("module.")}
    model = ResNet(ResNetConfig.from_dict(source["model_config"]), name=source["architecture"])
    model.load_state_dict(weights)
    save_pretrained(model, model_dir, extra={"trained_with": cfg.to_dict(), "best_top1": best, **(extra or {})})
    return model
