"""``evaluate``: a model's loss, top-1/top-5 and confusion matrix on a dataset (the training engine's
periodic evaluations use it too); ``evaluate_model``: that for a trained model, with its reports on disk."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from resnetlab.data import TensorImageDataset, build_data
from resnetlab.errors import ConfigError, DataError
from resnetlab.sources import resolve_source
from resnetlab.train.execution import resolve_device
from resnetlab.train.metrics import accuracy_counts
from resnetlab.train.rundir import RunDir


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
    progress: str | None = None,
) -> dict[str, Any]:
    """Loss, top-1 and top-5 accuracy and the confusion matrix of ``model`` on ``dataset``.

    Ten-crop items ``(10, C, H, W)`` are averaged over their crops. ``progress``: a label for a progress
    bar on stderr (a full test set takes a while on a CPU); None shows nothing.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, generator=torch.Generator())
    n_classes = num_classes or len(getattr(dataset, "classes", [])) or 0
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    total, loss_sum, top1, top5 = 0, 0.0, 0, 0
    batches = tqdm(loader, desc=progress, disable=progress is None, leave=False, unit="batch", file=sys.stderr)
    for x, y in batches:
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


def evaluate_model(
    source: str,
    *,
    data: str | None = None,
    split: str = "test",
    pretrained: str | bool | None = None,
    allow_program: bool = False,
    random_init: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    ten_crop: bool = False,
    num_workers: int = 2,
    out_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``source`` (any ``resnetlab.sources`` source) on ``data`` (default: what it was trained on;
    a source that does not record that needs ``data``).

    ``ten_crop``: average the logits of the paper's ten crops (see ``eval_transform``). ``num_workers``:
    DataLoader workers for datasets decoded per image. ``progress``: a progress bar on stderr. The reports
    go to ``out_dir``, default ``default_eval_dir(source)``: one folder per source.
    """
    resolved = resolve_source(source, pretrained=pretrained)
    trained: dict[str, Any] = {}  # the same data, and the same held-out split
    if data is None:
        trained = resolved.trained_with("eval")
        data = trained["data"]
    model = resolved.load(allow_program=allow_program, random_init=random_init)
    config = model.config
    bundle = build_data(
        data, augment="none", image_size=config.input_size[-1],
        mean=config.mean, std=config.std, crop_pct=config.crop_pct, ten_crop=ten_crop,
        val_split=trained.get("val_split", 0), seed=trained.get("seed", 0),
    )  # fmt: skip
    dataset = {"train": bundle.train, "val": bundle.val, "test": bundle.test}[split]
    if dataset is None:
        raise DataError(f"{bundle.name} has no {split} split; choose another --split")
    if bundle.num_classes != config.num_classes:
        raise ConfigError(
            f"the model predicts {config.num_classes} classes but {bundle.name} has {bundle.num_classes}; "
            "evaluate on the dataset it was trained for"
        )
    if config.label_names and list(config.label_names) != bundle.classes:
        warnings.warn(f"class names differ from the model's: {bundle.classes[:5]}... vs "
                      f"{list(config.label_names)[:5]}...; accuracy assumes the same order", stacklevel=2)  # fmt: skip
    dev = resolve_device(device)
    label = f"evaluating on {len(dataset)} {split} images" if progress else None
    result = evaluate(model.to(dev), dataset, dev, batch_size=batch_size, num_classes=bundle.num_classes,
                      num_workers=workers_for(dataset, num_workers), progress=label)  # fmt: skip
    confusion: torch.Tensor = result.pop("confusion")
    per_class = (100 * confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    out = out_dir or default_eval_dir(source, pretrained)
    out.mkdir(parents=True, exist_ok=True)
    variant = f"{split}_ten_crop" if ten_crop else split  # a ten-crop eval does not replace a single-view one
    png = out / f"confusion_{variant}.png"
    plot_confusion(confusion, bundle.classes, png)
    with open(out / f"per_class_{variant}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "images", "top1"])
        writer.writerows([c, int(n), f"{a:.2f}"] for c, n, a in zip(bundle.classes, confusion.sum(1), per_class))
    report = {
        "model": str(source), "architecture": model.name, "data": bundle.name, "split": split,
        "ten_crop": ten_crop, **result,
        "per_class": dict(zip(bundle.classes, per_class)), "confusion": confusion.tolist(),
        "confusion_png": str(png),
    }  # fmt: skip
    (out / f"eval_{variant}.json").write_text(json.dumps(report, indent=2))
    return report


def default_eval_dir(source: str, pretrained: str | None = None) -> Path:
    """Where an eval of ``source`` writes, one folder per source so that no eval overwrites another's: a
    folder's own ``eval/``; a run's checkpoint ``X/checkpoints/last.pt``: ``X/eval/last/``; another file:
    ``runs/eval/<name>-<hash of its path>/``; a model name: ``runs/eval/<name>[-<weights tag>]/``."""
    path = Path(source)
    if path.is_dir():
        return RunDir(path).eval
    if path.is_file():
        run = RunDir.of_checkpoint(path)
        if path.parent == run.checkpoints and run.is_run():
            return run.eval / path.stem
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
        return Path("runs") / "eval" / f"{path.stem}-{digest}"
    tag = f"-{Path(str(pretrained)).stem}" if pretrained else ""
    return Path("runs") / "eval" / f"{path.name}{tag}"


def plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    rates = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1 + 0.45 * n))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                value = int(confusion[i, j])
                if value:
                    ax.text(j, i, value, ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_title("confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
