"""``finetune(cfg, strategy)``: a pretrained ResNet, a new head for the dataset's classes, and a strategy.

The source (``cfg.pretrained``) is anything ``load_pretrained_source`` understands. The run itself is the
training engine's (``resnetlab.train.train``): the same options as ``resnetlab train``, AMP, EMA, atomic
checkpoints, resume, SIGINT/SIGTERM, the NaN guard and torchrun. The strategy plugs into the engine as
its ``TrainHooks``: which parts train in each epoch, their BatchNorm mode and their learning rates.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from resnetlab.data import DataBundle, build_data
from resnetlab.errors import ConfigError, WeightsError
from resnetlab.loading import load_model
from resnetlab.models import ResNet, create_model
from resnetlab.models.hub import fetch_weights
from resnetlab.models.registry import WeightsSource, resolve_name
from resnetlab.models.weights import load_weights
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
                                no_decay_norm_bias=cfg.no_decay_norm_bias)  # fmt: skip

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
    """The network to start from.

    ``source``: a resnetlab run/model folder or training checkpoint; a weights file of torchvision, timm,
    Hugging Face or akamaster layout (``model`` names the architecture); a torchvision weights name such
    as ``ResNet50_Weights.IMAGENET1K_V2`` (downloaded, or found in the weights cache); a weights tag of
    ``model`` (``tv_in1k``, ``cifar10_akamaster``); or ``None`` (random init: training from scratch).
    ``overrides`` are ``ResNetConfig`` fields (``in_chans`` adapts the first conv).
    """
    if source is None:
        return _as_resnet(create_model(model or "resnet18", **overrides))
    text, path = str(source), Path(source)
    if "_Weights." in text and not path.exists():
        arch = _torchvision_weights_arch(text)
        state_dict, extra = fetch_weights(WeightsSource("torchvision", text, "torchvision"))
        net = _as_resnet(create_model(arch, **{**extra, **overrides}))
        load_weights(net, state_dict, origin=text)
        return net
    if path.is_file() and model is not None:
        try:  # a resnetlab training checkpoint describes itself (architecture, preprocessing, labels)
            net = load_model(path, **overrides)
        except WeightsError:  # a plain weights file of another library's layout: --model says what it is
            return _as_resnet(create_model(model, pretrained=path, **overrides))
        if net.name != resolve_name(model):
            raise WeightsError(f"{path} is a checkpoint of {net.name}, not {model}; drop --model or pass "
                               f"--model {net.name}")  # fmt: skip
        return net
    if not path.exists() and model is not None:  # a weights tag of the named model
        return _as_resnet(create_model(model, pretrained=text, **overrides))
    try:
        return load_model(path if path.exists() else text, **overrides)
    except WeightsError as err:
        if path.is_file():
            raise WeightsError(f"{err}. If {path} is a torchvision/timm/Hugging Face weights file, also pass the "
                               "architecture (--model resnet50)") from err  # fmt: skip
        raise


def _torchvision_weights_arch(name: str) -> str:
    """Our architecture for a torchvision weights name (``ResNet50_Weights.IMAGENET1K_V2``), or a
    ``WeightsError`` listing the names torchvision has for it."""
    from torchvision.models import get_model_weights

    enum_name, _, member = name.partition(".")
    arch = resolve_name(enum_name.removesuffix("_Weights").lower())
    try:
        members = list(get_model_weights(arch).__members__)
    except (ValueError, KeyError):
        raise WeightsError(f"torchvision has no weights for {arch} ({name}); pass a weights file with "
                           f"--model {arch} instead") from None  # fmt: skip
    if member not in members:
        valid = ", ".join(f"{enum_name}.{m}" for m in members)
        raise WeightsError(f"{name} is not a torchvision weights name; {arch} has: {valid}")
    return arch


def _as_resnet(model: Any) -> ResNet:
    assert isinstance(model, ResNet)
    return model


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
) -> FinetuneResult:
    """Fine-tune ``cfg.pretrained`` (None: from scratch, the baseline) on ``cfg.data``; see the module doc.

    ``cfg`` takes every ``resnetlab train`` option; ``cfg.model`` names the architecture for weight files
    and tags. ``bundle`` skips loading ``cfg.data`` (its in_chans adapts conv1). ``resume``: a run folder
    or checkpoint of a fine-tuning run to continue, with its saved strategy (``cfg``, ``strategy``: None,
    or only the changes ``train(resume=...)`` allows). ``callbacks``: called after every optimizer step.
    """
    resume = resume if resume is not None else auto_resume_target(cfg)  # a restarted torchrun worker
    if resume is not None:
        if cfg is not None:  # the data settings this run resolved from its model, where cfg leaves them open
            saved = saved_config(resume)
            cfg = cfg.replace(**{k: getattr(saved, k) for k in RESOLVED if getattr(cfg, k) is None})
        result = train(cfg, resume=resume, bundle=bundle, hooks=StrategyHooks(strategy), callbacks=callbacks)
    else:
        if cfg is None:
            raise ConfigError("finetune() needs a TrainConfig, or resume= naming a run to continue")
        strategy = strategy or FinetuneStrategy()
        torch.manual_seed(cfg.seed)  # the new head's initialisation
        model = load_pretrained_source(cfg.pretrained, cfg.model)
        if bundle is None:
            bundle = prepare_data(cfg, model)
        if bundle.in_chans != model.config.in_chans:  # grey or multispectral data: adapt conv1 while loading
            model = load_pretrained_source(cfg.pretrained, cfg.model, in_chans=bundle.in_chans)
        attach_head(model, bundle)
        # the data as prepared for this model, recorded so that a resumed run rebuilds the same splits
        resolved = {"image_size": bundle.image_size, "mean": list(bundle.mean), "std": list(bundle.std)}
        cfg = cfg.replace(**{k: v for k, v in resolved.items() if getattr(cfg, k) is None})
        hooks = StrategyHooks(strategy, None if cfg.pretrained is None else str(cfg.pretrained))
        result = train(cfg, model=model, bundle=bundle, hooks=hooks, callbacks=callbacks)
    if dist.rank() == 0:
        (result.run_dir / "history.json").write_text(json.dumps(result.history, indent=1))
    return FinetuneResult(result.model, result.history, result.best_accuracy, result.final_accuracy,
                          result.run_dir, result.model_dir, result.seconds, test_accuracy=result.test_accuracy,
                          selected=result.selected, steps=result.steps)  # fmt: skip
