"""What a run records: a progress bar, metrics.csv, TensorBoard scalars, a log file and curves.png."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

CSV_FIELDS = ["step", "epoch", "lr", "train_loss", "train_top1", "eval_loss", "eval_top1", "eval_top5",
              "images_per_second"]  # fmt: skip


def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """Number of top-1 and top-5 hits in a batch."""
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=1).indices
    hits = top == targets[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


class _Progress:
    """A tqdm bar for one epoch with loss, accuracy, lr, img/s (tqdm shows the ETA)."""

    def __init__(self, epoch: int, epochs: int, total: int, start: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", disable=not enabled,
                        leave=False, dynamic_ncols=True)  # fmt: skip
        self.eval_text = ""

    def update(self, loss: float, running: dict[str, Any], lr: float, images_per_second: float) -> None:
        acc = 100 * running["correct"] / max(running["count"], 1)
        self.bar.set_postfix_str(f"loss {loss:.3f} acc {acc:.1f}% lr {lr:.3g} {images_per_second:.0f} img/s"
                                 + self.eval_text, refresh=False)  # fmt: skip
        self.bar.update(1)

    def set_eval(self, result: dict[str, Any] | None) -> None:
        if result is not None:
            self.eval_text = f" | eval {result['top1']:.2f}%"

    def close(self) -> None:
        self.bar.close()


class MetricsLogger:
    """Writes the run directory: config.yaml, log.txt, metrics.csv and TensorBoard events (rank 0 only)."""

    def __init__(self, run_dir: Path, cfg: Any, *, enabled: bool, resume: bool) -> None:
        self.run_dir, self.enabled, self.writer = run_dir, enabled, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.csv_path = run_dir / "metrics.csv"
        if not self.csv_path.exists():
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(CSV_FIELDS)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log_text(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)  # stdout stays clean for --json
            with open(self.run_dir / "log.txt", "a") as f:
                f.write(message + "\n")

    def progress(self, epoch: int, epochs: int, total: int, start: int, enabled: bool) -> _Progress:
        return _Progress(epoch, epochs, total, start, enabled)

    def record(self, step: int, epoch: int, lr: float, running: dict[str, Any], result: dict[str, Any] | None,
               images_per_second: float) -> dict[str, Any]:  # fmt: skip
        count = max(running["count"], 1)
        row: dict[str, Any] = {
            "step": step, "epoch": epoch, "lr": lr, "train_loss": running["loss"] / count,
            "train_top1": 100 * running["correct"] / count, "images_per_second": images_per_second,
        }  # fmt: skip
        if result is not None:
            row.update(eval_loss=result["loss"], eval_top1=result["top1"], eval_top5=result["top5"])
        if self.enabled:
            with open(self.csv_path, "a", newline="") as f:
                csv.DictWriter(f, CSV_FIELDS).writerow(row)
            if self.writer is not None:
                for key, value in row.items():
                    if key != "step":
                        self.writer.add_scalar(key.replace("_", "/", 1), value, step)
            text = (f"step {step} epoch {epoch} | train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2f}%"
                    f" | lr {lr:.4g} | {images_per_second:.0f} img/s")  # fmt: skip
            if result is not None:
                text += f" | eval loss {result['loss']:.4f} top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%"
            self.log_text(text)
        return row

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss, accuracy and learning rate against steps, as one PNG."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["train_loss"] for r in history], label="train")
    if any("eval_loss" in r for r in history):
        axes[0].plot([r["step"] for r in history if "eval_loss" in r],
                     [r["eval_loss"] for r in history if "eval_loss" in r], label="eval")  # fmt: skip
    axes[1].plot(steps, [r["train_top1"] for r in history], label="train")
    if any("eval_top1" in r for r in history):
        axes[1].plot([r["step"] for r in history if "eval_top1" in r],
                     [r["eval_top1"] for r in history if "eval_top1" in r], label="eval")  # fmt: skip
    axes[2].plot(steps, [r["lr"] for r in history])
    for ax, title in zip(axes, ("loss", "top-1 accuracy (%)", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
