"""Draw the training figures of docs/results/training.md from the committed metrics.csv files.

    python docs/results/training_figures.py

- docs/figures/paper_resnet20.png: the paper-recipe run (runs/paper-resnet20, ``--recipe cifar-paper``):
  training error (thin) and test error (bold) against iterations, as in He et al. 2015, Fig. 6, with the
  paper's 8.75% test error of ResNet-20 and the two learning-rate drops marked.
- docs/figures/fast_resnets.png: the ``cifar-fast`` runs (runs/fast-resnet20, runs/fast-resnet56; trained on
  45k images, curves on the held-out 5k val split, the test set graded once at the end, marked as a star).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).parent
RUNS = HERE / "runs"
FIGURES = HERE.parent / "figures"
#: Test errors of the paper (He et al. 2015, Table 6; lossless CIFAR-10 test set).
PAPER_TEST_ERROR = {"resnet20": 8.75, "resnet56": 6.97}
COLOURS = {"resnet20": "tab:blue", "resnet56": "tab:red"}


def evaluations(run: str) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv that carry an evaluation."""
    with open(RUNS / run / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("eval_top1")]


def paper_figure() -> Path:
    evals = evaluations("paper-resnet20")
    steps = [int(r["step"]) for r in evals]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(steps, [100 - float(r["train_top1"]) for r in evals], color="tab:blue", lw=1, marker="o", ms=2.5,
            label="ResNet-20, training error (augmented batches)")
    ax.plot(steps, [100 - float(r["eval_top1"]) for r in evals], color="tab:blue", lw=2.4, marker="o", ms=3,
            label="ResNet-20, test error (JPEG test set)")
    ax.axhline(PAPER_TEST_ERROR["resnet20"], color="black", ls=":", lw=1, label="paper: 8.75% (lossless test set)")
    for drop in (32_000, 48_000):
        ax.axvline(drop, color="grey", lw=0.8, alpha=0.6)
    ax.set_xlabel("iterations (batch 128; lr 0.1, /10 at 32k and 48k)")
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 40)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("ResNet-20, cifar-paper recipe (64k iterations, bf16), CIFAR-10 JPEG: train 50k / test 10k",
                 fontsize=9)
    fig.tight_layout()
    out = FIGURES / "paper_resnet20.png"
    fig.savefig(out, dpi=110)
    return out


def fast_figure() -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for model, colour in COLOURS.items():
        if not (RUNS / f"fast-{model}" / "metrics.csv").is_file():
            continue
        evals = evaluations(f"fast-{model}")
        steps = [int(r["step"]) for r in evals]
        name = model.replace("resnet", "ResNet-")
        ax.plot(steps, [100 - float(r["train_top1"]) for r in evals], color=colour, lw=1, marker="o", ms=2,
                label=f"{name}, training error (augmented batches)")
        ax.plot(steps, [100 - float(r["eval_top1"]) for r in evals], color=colour, lw=2.4, marker="o", ms=3,
                label=f"{name}, val error (held-out 5k)")
        summary = json.loads((RUNS / f"fast-{model}" / "result.json").read_text())
        ax.plot([steps[-1]], [100 - summary["test_accuracy"]], color=colour, marker="*", ms=13, ls="none",
                label=f"{name}, test error once at the end: {100 - summary['test_accuracy']:.2f}%")
        ax.axhline(PAPER_TEST_ERROR[model], color=colour, ls=":", lw=1,
                   label=f"paper {name}: {PAPER_TEST_ERROR[model]}% (lossless test set)")
    ax.set_xlabel("iterations (batch 128; 30 epochs of 45k images, cosine lr from 0.1)")
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 40)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title("cifar-fast recipe (bf16, 2 CPU cores), CIFAR-10 JPEG: train 45k / val 5k / test 10k", fontsize=9)
    fig.tight_layout()
    out = FIGURES / "fast_resnets.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    for path in (paper_figure(), fast_figure()):
        print(path)
