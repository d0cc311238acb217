"""``finetune(cfg, strategy)``: a pretrained ResNet, a new head for the dataset's classes, and a strategy.

The source (``cfg.pretrained``) is anything ``load_pretrained_source`` understands. The run itself is the
training engine's (``resnetlab.train.train``): the same options as ``resnetlab train``, AMP, EMA, atomic
checkpoints, resume, SIGINT/SIGTERM, the NaN guard and torchrun. The strategy plugs into the engine as
its ``TrainHooks``: which parts train in each epoch, their BatchNorm mode and their learning rates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resnetlab.data import DataBundle, build_data
from resnetlab.errors import ConfigError
from resnetlab.models import ResNet, create_model
from resnetlab.sources import resolve_source
from resnetlab.train import StepInfo, TrainConfig, train
from resnetlab.train import distributed as dist
from resnetlab.train.engine import TrainHooks, auto_resume_target, saved_config
from resnetlab.transfer.strategy import FinetuneStrategy, apply_strategy, parameter_groups


@dataclass
class FinetuneResult:
    model: ResNet
    history: list[dict[str, Any]]
    best_accuracy: float
    final_accuracy: float
    run_dir: Path
    model_dir: Path
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    test_accuracy: float | None = None  # the exported model on the test set (see TrainResult)
    selected: str = "final"  # "best-val" or "final" (see TrainResult)
    steps: int = 0

    def summary(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "model_dir": str(self.model_dir), "steps": self.steps,
                "best_accuracy": self.best_accuracy, "final_accuracy": self.final_accuracy,
                "test_accuracy": self.test_accuracy, "selected": self.selected,
                "seconds": round(self.seconds, 2), **self.extra}  # fmt: skip


#: Data settings a fine-tuning run takes from its pretrained model unless given (see ``prepare_data``).
RESOLVED = ("image_size", "mean", "std")


class StrategyHooks(TrainHooks):
    """A ``FinetuneStrategy`` as the engine's hooks: per-part lrs, and each epoch's frozen parts and BN modes.

    ``strategy=None`` takes the one saved in the checkpoint of the run being resumed.
    """

    kind = "finetune"

    def __init__(self, strategy: FinetuneStrategy | None, source: str | None = None) -> None:
        self.strategy, self.source = strategy, source

    def parameter_groups(self, model: ResNet, cfg: TrainConfig) -> list[dict[str, Any]]:
        return parameter_groups(model, cfg.lr, cfg.weight_decay, self._strategy().lr_decay,
                                no_decay_norm_bias=cfg.no_decay_norm_bias,
                                no_decay_norm=cfg.no_decay_norm)  # fmt: skip

    def train_mode(self, model: ResNet, epoch: int) -> dict[str, Any]:
        model.train()
        return {"trainable": apply_strategy(model, self._strategy(), epoch)}

    def export_extra(self) -> dict[str, Any]:
        return {"finetuned_from": self.source, "finetune_strategy": dataclasses.asdict(self._strategy())}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "strategy": dataclasses.asdict(self._strategy()), "source": self.source}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = FinetuneStrategy(**state["strategy"])
        if self.strategy is not None and self.strategy != saved:
            raise ConfigError(f"the run was fine-tuned with {saved}, not {self.strategy}; resume it without a "
                              "strategy (the saved one is used), or start a new run")  # fmt: skip
        self.strategy, self.source = saved, state.get("source")

    def _strategy(self) -> FinetuneStrategy:
        if self.strategy is None:
            raise ConfigError("no fine-tuning strategy: pass one, or resume a saved fine-tuning run")
        return self.strategy


def load_pretrained_source(source: str | os.PathLike | None, model: str | None = None, **overrides: Any) -> ResNet:
    """The network to start from (see ``resnetlab.sources``): a resnetlab run/model folder or checkpoint
    (they describe their own architecture); a published weights file (recognised by its sha256); a weights
    file of torchvision, timm or Hugging Face layout (``model`` names the architecture); a torchvision
    weights name such as ``ResNet50_Weights.IMAGENET1K_V2``; a weights tag of ``model`` (``tv_in1k``,
    ``cifar10_akamaster``); or ``None`` (random init: training from scratch).
    ``overrides`` are ``ResNetConfig`` fields (``in_chans`` adapts the first conv).
    """
    if source is None:
        return create_model_resnet(model or "resnet18", **overrides)
    return resolve_source(source, model=model).load_resnet(**overrides)


def _starting_point(cfg: TrainConfig) -> Callable[..., ResNet]:
    """What ``cfg.pretrained`` names, as a loader taking ``ResNetConfig`` overrides. ``cfg.model`` names the
    architecture of weights files, tags and the from-scratch baseline; a run/model folder or checkpoint
    records its own (the recipe's model does not apply to it)."""
    if cfg.pretrained is None:
        return functools.partial(create_model_resnet, cfg.model or "resnet18")
    resolved = resolve_source(cfg.pretrained, model=cfg.model)
    if resolved.kind == "checkpoint":
        resolved = dataclasses.replace(resolved, name=None)
    return resolved.load_resnet


def create_model_resnet(name: str, **overrides: Any) -> ResNet:
    """An untrained ``name`` (the from-scratch baseline)."""
    net = create_model(name, **overrides)
    assert isinstance(net, ResNet)
    return net


def prepare_data(cfg: TrainConfig, model: ResNet) -> DataBundle:
    """``cfg.data`` normalised as the pretrained model expects (its mean/std; averaged for grey images)."""
    mean, std = cfg.mean or list(model.config.mean), cfg.std or list(model.config.std)
    size = cfg.image_size or model.config.input_size[-1]
    options = dict(augment=cfg.augment, image_size=size, val_split=cfg.val_split, seed=cfg.seed,
                   download=cfg.download, auto_augment=cfg.auto_augment, random_erasing=cfg.random_erasing)  # fmt: skip
    try:
        return build_data(cfg.data, mean=mean, std=std, **options)
    except ConfigError as err:
        if cfg.mean or "mean/std need 1" not in str(err):
            raise
        return build_data(cfg.data, mean=[sum(mean) / len(mean)], std=[sum(std) / len(std)], **options)


def attach_head(model: ResNet, bundle: DataBundle) -> None:
    """A fresh classifier for the dataset's classes, and the preprocessing that predict/serve will use."""
    model.reset_classifier(bundle.num_classes)
    size = bundle.image_size
    model.config = model.config.replace(
        input_size=(bundle.in_chans, size, size), mean=tuple(bundle.mean), std=tuple(bundle.std),
        crop_pct=1.0 if size <= 64 else 0.875, label_names=tuple(bundle.classes),
    )  # fmt: skip


def finetune(
    cfg: TrainConfig | None,
    strategy: FinetuneStrategy | None = None,
    *,
    bundle: DataBundle | None = None,
    resume: str | os.PathLike | None = None,
    callbacks: list[Callable[[StepInfo], None]] | None = None,
    overwrite: bool = False,
    log_every: int = 0,
) -> FinetuneResult:
    """Fine-tune ``cfg.pretrained`` (None: from scratch, the baseline) on ``cfg.data``; see the module doc.

    ``cfg`` takes every ``resnetlab train`` option; ``cfg.model`` names the architecture for weight files
    and tags. ``bundle`` skips loading ``cfg.data`` (its in_chans adapts conv1). ``resume``: a run folder
    or checkpoint of a fine-tuning run to continue, with its saved strategy (``cfg``, ``strategy``: None,
    or only the changes ``train(resume=...)`` allows). ``callbacks``: called after every optimizer step.
    ``overwrite`` and ``log_every``: as in ``train`` (replace a run already in ``cfg.run_dir``; log the
    training figures every N steps).
    """
    resume = resume if resume is not None else auto_resume_target(cfg)  # a restarted torchrun worker
    if resume is not None:
        if cfg is not None:  # the data settings this run resolved from its model, where cfg leaves them open
            saved = saved_config(resume)
            resolved = {k: getattr(saved, k) for k in RESOLVED if getattr(cfg, k) is None}
            cfg = cfg.replace(model=saved.model, **resolved)  # the architecture came from the source
        result = train(cfg, resume=resume, bundle=bundle, hooks=StrategyHooks(strategy), callbacks=callbacks,
                       overwrite=overwrite, log_every=log_every)  # fmt: skip
    else:
        if cfg is None:
            raise ConfigError("finetune() needs a TrainConfig, or resume= naming a run to continue")
        strategy = strategy or FinetuneStrategy()
        torch.manual_seed(cfg.seed)  # the new head's initialisation
        start = _starting_point(cfg)
        model = start()
        # a source that records its architecture and input size keeps them (not the recipe's resnet18 at 224)
        cfg = cfg.replace(model=model.name)
        if bundle is None:
            bundle = prepare_data(cfg, model)
        if bundle.in_chans != model.config.in_chans:  # grey or multispectral data: adapt conv1 while loading
            model = start(in_chans=bundle.in_chans)
        attach_head(model, bundle)
        # the data as prepared for this model, recorded so that a resumed run rebuilds the same splits
        resolved = {"image_size": bundle.image_size, "mean": list(bundle.mean), "std": list(bundle.std)}
        cfg = cfg.replace(**{k: v for k, v in resolved.items() if getattr(cfg, k) is None})
        hooks = StrategyHooks(strategy, None if cfg.pretrained is None else str(cfg.pretrained))
        result = train(cfg, model=model, bundle=bundle, hooks=hooks, callbacks=callbacks, overwrite=overwrite,
                       log_every=log_every)  # fmt: skip
    if dist.rank() == 0:
        (result.run_dir / "history.json").write_text(json.dumps(result.history, indent=1))
    return FinetuneResult(result.model, result.history, result.best_accuracy, result.final_accuracy,
                          result.run_dir, result.model_dir, result.seconds, test_accuracy=result.test_accuracy,
                          selected=result.selected, steps=result.steps)  # fmt: skip
