"""``finetune(cfg, strategy)``: a pretrained ResNet, a new head for the dataset's classes, and a strategy.

The source (``cfg.pretrained``) is anything ``load_pretrained_source`` understands; the data, schedule,
batches and evaluation are the training engine's (``resnetlab.train``), so a fine-tuning run takes the
same options as ``resnetlab train``. The step loop is its own because strategies change which parameters
train and at which lr while the run goes (the engine's optimizer is fixed at the start).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from resnetlab.data import DataBundle, build_data
from resnetlab.errors import ConfigError, WeightsError
from resnetlab.loading import load_model
from resnetlab.models import ResNet, create_model, save_pretrained
from resnetlab.models.registry import WeightsSource, resolve_name
from resnetlab.models.weights import fetch_weights, load_weights
from resnetlab.train import TrainConfig, evaluate
from resnetlab.train.engine import TrainBatches, lr_factor, new_run_dir, resolve_device
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

    def summary(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "model_dir": str(self.model_dir),
                "best_accuracy": self.best_accuracy, "final_accuracy": self.final_accuracy,
                "seconds": round(self.seconds, 2), **self.extra}  # fmt: skip


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
                   download=cfg.download, auto_augment=cfg.auto_augment, random_erasing=cfg.random_erasing)
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
    cfg: TrainConfig, strategy: FinetuneStrategy | None = None, *, bundle: DataBundle | None = None
) -> FinetuneResult:
    """Fine-tune ``cfg.pretrained`` (None: from scratch, the baseline) on ``cfg.data``; see the module doc.

    Uses of ``cfg``: model (architecture for weight files/tags), data, image_size, augment, lr, momentum,
    weight_decay, optimizer, batch_size, epochs/max_iters, schedule, warmup_iters, label_smoothing,
    device, seed, run_dir/runs_root. ``bundle`` skips loading ``cfg.data`` (its in_chans adapts conv1).
    """
    strategy = strategy or FinetuneStrategy()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    probe = load_pretrained_source(cfg.pretrained, cfg.model)
    if bundle is None:
        bundle = prepare_data(cfg, probe)
    if bundle.in_chans != probe.config.in_chans:  # grey or multispectral data: adapt conv1 while loading
        probe = load_pretrained_source(cfg.pretrained, cfg.model, in_chans=bundle.in_chans)
    model = probe
    attach_head(model, bundle)
    model.to(device)

    batches = TrainBatches(cfg, bundle, device, cfg.batch_size)
    steps_per_epoch = len(batches)
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(bundle.train)} training images")
    total_steps = cfg.max_iters or cfg.epochs * steps_per_epoch
    groups = parameter_groups(model, cfg.lr, cfg.weight_decay, strategy.lr_decay)
    optimizer = (torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
                 if cfg.optimizer == "sgd" else torch.optim.AdamW(groups, lr=cfg.lr))  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg, s, total_steps, steps_per_epoch, model.config.depth)
    )
    eval_set = bundle.val if bundle.val is not None else bundle.test
    run_dir = Path(cfg.run_dir) if cfg.run_dir else new_run_dir(cfg)
    model_dir = run_dir / "model"
    history: list[dict[str, Any]] = []
    best, step, start = -1.0, 0, time.perf_counter()
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        model.train()
        trainable = apply_strategy(model, strategy, epoch)
        loss_sum, seen = 0.0, 0
        for x, y in batches.epoch(epoch, 0):
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum, seen, step = loss_sum + loss.item() * len(y), seen + len(y), step + 1
            if step >= total_steps:
                break
        record: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1),
                                  "trainable": trainable}  # fmt: skip
        if eval_set is not None:
            result = evaluate(model, eval_set, device, num_classes=bundle.num_classes)
            record.update(eval_loss=result["loss"], eval_top1=result["top1"])
            if result["top1"] > best:
                best = result["top1"]
                save_pretrained(model, model_dir, extra={"finetuned_from": str(cfg.pretrained), "best_top1": best})
        history.append(record)
        if cfg.progress:
            print(json.dumps(record), flush=True)
    if best < 0:
        save_pretrained(model, model_dir, extra={"finetuned_from": str(cfg.pretrained)})
    (run_dir / "history.json").write_text(json.dumps(history, indent=1))
    final = history[-1].get("eval_top1", float("nan"))
    return FinetuneResult(model, history, best, final, run_dir, model_dir, time.perf_counter() - start)
