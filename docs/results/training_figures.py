"""Draw docs/figures/paper_resnet20.png from the committed metrics.csv of the paper-recipe run.

    python docs/results/training_figures.py

Reads docs/results/runs/paper-resnet20/metrics.csv (written by ``resnetlab train --recipe cifar-paper``):
training error (thin) and test error (bold) against iterations, as in He et al. 2015, Fig. 6, with the
paper's 8.75% test error of ResNet-20 and the two learning-rate drops marked.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
PAPER_TEST_ERROR = 8.75  # ResNet-20, CIFAR-10 test set (lossless), He et al. 2015, Table 6


def main() -> None:
    rows = list(csv.DictReader(open(HERE / "runs" / "paper-resnet20" / "metrics.csv")))
    evals = [r for r in rows if r.get("eval_top1")]
    steps = [int(r["step"]) for r in evals]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(steps, [100 - float(r["train_top1"]) for r in evals], color="tab:blue", lw=1, marker="o", ms=2.5,
            label="ResNet-20, training error (augmented batches)")
    ax.plot(steps, [100 - float(r["eval_top1"]) for r in evals], color="tab:blue", lw=2.4, marker="o", ms=3,
            label="ResNet-20, test error (JPEG test set)")
    ax.axhline(PAPER_TEST_ERROR, color="black", ls=":", lw=1, label="paper: 8.75% (lossless test set)")
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
    out = HERE.parent / "figures" / "paper_resnet20.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
