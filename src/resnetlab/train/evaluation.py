"""``evaluate_model``: accuracy, per-class accuracy and a confusion matrix for a trained model."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from resnetlab.data import build_data
from resnetlab.errors import ConfigError, DataError
from resnetlab.sources import resolve_source
from resnetlab.train.engine import evaluate, resolve_device, workers_for


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
) -> dict[str, Any]:
    """Evaluate ``source`` (any ``resnetlab.sources`` source) on ``data`` (default: what it was trained on;
    a source that does not record that needs ``data``).

    ``ten_crop``: average the logits of the paper's ten crops (see ``eval_transform``). ``num_workers``:
    DataLoader workers for datasets decoded per image.
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
    result = evaluate(model.to(dev), dataset, dev, batch_size=batch_size, num_classes=bundle.num_classes,
                      num_workers=workers_for(dataset, num_workers))  # fmt: skip
    confusion: torch.Tensor = result.pop("confusion")
    per_class = (100 * confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    out = out_dir or _default_out(source)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"confusion_{split}.png"
    plot_confusion(confusion, bundle.classes, png)
    with open(out / f"per_class_{split}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "images", "top1"])
        writer.writerows([c, int(n), f"{a:.2f}"] for c, n, a in zip(bundle.classes, confusion.sum(1), per_class))
    report = {
        "model": str(source), "architecture": model.name, "data": bundle.name, "split": split, **result,
        "per_class": dict(zip(bundle.classes, per_class)), "confusion": confusion.tolist(),
        "confusion_png": str(png),
    }  # fmt: skip
    (out / f"eval_{split}.json").write_text(json.dumps(report, indent=2))
    return report


def _default_out(source: str) -> Path:
    path = Path(source)
    return path / "eval" if path.is_dir() else Path("runs") / "eval" / path.stem


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
