"""What a run records: a progress bar, metrics.csv, TensorBoard scalars, a log file and curves.png."""

from __future__ import annotations

import contextlib
import csv
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from resnetlab.train.rundir import RunDir

CSV_FIELDS = ["step", "epoch", "lr", "train_loss", "train_top1", "eval_loss", "eval_top1", "eval_top5",
              "images_per_second"]  # fmt: skip


def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """Number of top-1 and top-5 hits in a batch."""
    k = min(5, logits.shape[-1])
    top = logits.topk(k, dim=1).indices
    hits = top == targets[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


class Throughput:
    """Training images per second, counting only the time spent in training steps (data loading included,
    evaluations and checkpoints not): ``paused()`` brackets the time that is not training."""

    def __init__(self) -> None:
        self.images, self.seconds, self._mark = 0, 0.0, time.perf_counter()

    def add(self, images: int) -> None:
        """Count a step's images and the time since the previous step (or the end of a pause)."""
        now = time.perf_counter()
        self.images, self.seconds, self._mark = self.images + images, self.seconds + now - self._mark, now

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        try:
            yield
        finally:
            self._mark = time.perf_counter()

    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def reset(self) -> None:
        """Start a new interval (after each logged row): the rate then reads the recent speed."""
        self.images, self.seconds = 0, 0.0


def epoch_of(step: int, steps_per_epoch: int) -> int:
    """The 1-based epoch that optimizer step ``step`` (1-based) belongs to: steps 1..N are epoch 1."""
    return max(1, math.ceil(step / steps_per_epoch))


class RunProgress:
    """One tqdm bar for the whole run, counting to its real total of steps (so the ETA is the run's), with
    the epoch it is in, loss, accuracy, lr and training img/s, and what it is doing between steps."""

    def __init__(self, step: int, total_steps: int, steps_per_epoch: int, enabled: bool) -> None:
        self.steps_per_epoch, self.epochs = steps_per_epoch, epoch_of(total_steps, steps_per_epoch)
        self.bar = tqdm(total=total_steps, initial=step, desc=self._epoch_text(step + 1), disable=not enabled,
                        dynamic_ncols=True, unit="step")  # fmt: skip
        self.eval_text = ""

    def _epoch_text(self, step: int) -> str:
        return f"epoch {epoch_of(step, self.steps_per_epoch)}/{self.epochs}"

    def update(self, step: int, loss: float, running: dict[str, Any], lr: float, images_per_second: float) -> None:
        acc = 100 * running["correct"] / max(running["count"], 1)
        self.bar.set_description_str(self._epoch_text(step), refresh=False)
        self.bar.set_postfix_str(f"loss {loss:.3f} acc {acc:.1f}% lr {lr:.3g} {images_per_second:.0f} img/s"
                                 + self.eval_text, refresh=False)  # fmt: skip
        self.bar.update(1)

    def note(self, text: str) -> None:
        """Say what the run is doing between steps (an evaluation, a checkpoint)."""
        self.bar.set_postfix_str(text + self.eval_text, refresh=True)

    def set_eval(self, result: dict[str, Any] | None, split: str) -> None:
        if result is not None:
            self.eval_text = f" | {split} {result['top1']:.2f}%"

    def close(self) -> None:
        self.bar.close()


class MetricsLogger:
    """Writes the run folder's records: config.yaml, log.txt, metrics.csv and TensorBoard events (rank 0
    only). metrics.csv is created with its first row, so a run that failed before training leaves none."""

    def __init__(self, rundir: RunDir, cfg: Any, *, enabled: bool, resume: bool) -> None:
        self.rundir, self.enabled, self.writer = rundir, enabled, None
        if not enabled:
            return
        rundir.path.mkdir(parents=True, exist_ok=True)
        if not resume:
            rundir.config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(rundir.tensorboard))

    def log_text(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stderr)  # stdout stays clean for --json
            with open(self.rundir.log, "a") as f:
                f.write(message + "\n")

    def record(self, step: int, epoch: int, lr: float, running: dict[str, Any], result: dict[str, Any] | None,
               images_per_second: float, *, total_steps: int, epochs: int, split: str = "eval",
               ) -> dict[str, Any]:  # fmt: skip
        """A metrics row: the training figures since the previous row, and ``result`` (an evaluation on
        ``split``) when there is one; ``images_per_second`` is the training speed, evaluations excluded."""
        count = max(running["count"], 1)
        row: dict[str, Any] = {
            "step": step, "epoch": epoch, "lr": lr, "train_loss": running["loss"] / count,
            "train_top1": 100 * running["correct"] / count, "images_per_second": images_per_second,
        }  # fmt: skip
        if result is not None:
            row.update(eval_loss=result["loss"], eval_top1=result["top1"], eval_top5=result["top5"])
        if self.enabled:
            new = not self.rundir.metrics.exists()
            with open(self.rundir.metrics, "a", newline="") as f:
                writer = csv.DictWriter(f, CSV_FIELDS)
                if new:
                    writer.writeheader()
                writer.writerow(row)
            if self.writer is not None:
                for key, value in row.items():
                    if key not in ("step", "epoch"):
                        self.writer.add_scalar(key.replace("_", "/", 1), value, step)
            text = (f"step {step}/{total_steps} epoch {epoch}/{epochs} | train loss {row['train_loss']:.4f} top-1 "
                    f"{row['train_top1']:.2f}% | lr {lr:.4g} | {images_per_second:.0f} img/s")  # fmt: skip
            if result is not None:
                text += (f" | {split} loss {result['loss']:.4f} top-1 {result['top1']:.2f}% "
                         f"top-5 {result['top5']:.2f}%")  # fmt: skip
            self.log_text(text)
        return row

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(history: list[dict[str, Any]], path: Path, *, title: str = "", split: str = "eval") -> None:
    """Loss, accuracy and learning rate against steps, as one PNG titled ``title``. Every point is marked,
    so a short run with a single evaluation still shows it; ``split`` names the evaluated split."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in history if "eval_top1" in r]
    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    style = {"marker": "o", "markersize": 3}
    axes[0].plot(steps, [r["train_loss"] for r in history], label="train", **style)
    axes[1].plot(steps, [r["train_top1"] for r in history], label="train", **style)
    if evals:
        eval_steps = [r["step"] for r in evals]
        axes[0].plot(eval_steps, [r["eval_loss"] for r in evals], label=split, **style)
        axes[1].plot(eval_steps, [r["eval_top1"] for r in evals], label=split, **style)
    axes[2].plot(steps, [r["lr"] for r in history], **style)
    for ax, name in zip(axes, ("loss", "top-1 accuracy (%)", "learning rate")):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
