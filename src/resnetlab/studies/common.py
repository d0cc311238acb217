"""What every study shares: its output folder, CSV/markdown writers, data and accuracy helpers."""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.data import DataBundle, build_data
from resnetlab.errors import ConfigError


def study_dir(name: str, out: str | Path | None) -> Path:
    """``out``, or a new ``runs/studies/<time>-<name>`` folder (suffixed -2, -3... when that exists, so two
    studies started in the same second never share a folder)."""
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    base = Path("runs") / "studies" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        path = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            path.mkdir()  # atomic: exactly one study gets each name
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new study folder next to {base}; pass --out")


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: Sequence[str] = ()) -> None:
    """Rows as CSV: ``fields`` first, then any other key of the rows. No rows still writes the header."""
    fields = list(dict.fromkeys([*fields, *(k for row in rows for k in row)]))
    if not fields:
        raise ValueError(f"{path}: no rows and no field names, nothing to write")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


#: Where report.md's figures begin: the terminal shows the text above it and the figures' paths instead.
FIGURES_HEADING = "## Figures"


def write_report(folder: Path, title: str, paragraphs: Sequence[str], summary: dict[str, Any],
                 figures: Sequence[str] = ()) -> Path:  # fmt: skip
    """report.md (for people, the ``figures`` of ``folder`` shown at its end) and summary.json (for scripts,
    with the figures' paths under "figures") side by side."""
    text = f"# {title}\n\n" + "\n\n".join(paragraphs) + "\n"
    if figures:
        text += f"\n{FIGURES_HEADING}\n\n" + "\n\n".join(f"![{Path(f).stem}]({f})" for f in figures) + "\n"
    summary["figures"] = [str(folder / f) for f in figures]
    (folder / "report.md").write_text(text)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return folder / "report.md"


def report_text(folder: Path) -> str:
    """report.md without its figures section: what a terminal can show (the figures are files to open)."""
    return (folder / "report.md").read_text().split(f"\n{FIGURES_HEADING}\n")[0].rstrip() + "\n"


def evaluation_split(bundle: DataBundle) -> tuple[str, Any]:
    """The split the studies evaluate on and its name: the test split, else the validation split."""
    if bundle.test is not None:
        return "test", bundle.test
    if bundle.val is not None:
        return "validation", bundle.val
    raise ConfigError(f"{bundle.name} has no test or validation split to evaluate on")


def study_data(source: str | None, *, subset: int | None = None, test_subset: int | None = None,
               seed: int = 0, **kwargs: Any) -> DataBundle:  # fmt: skip
    """``build_data`` with optional seeded subsets of train and test (CPU-sized studies)."""
    bundle = build_data(source, seed=seed, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    changes: dict[str, Any] = {}
    if subset and subset < len(bundle.train):
        changes["train"] = bundle.train.subset(torch.randperm(len(bundle.train), generator=generator)[:subset].tolist())
    evaluation = bundle.test if bundle.test is not None else bundle.val
    if test_subset and evaluation is not None and test_subset < len(evaluation):
        picked = evaluation.subset(torch.randperm(len(evaluation), generator=generator)[:test_subset].tolist())
        changes["test" if bundle.test is not None else "val"] = picked
    return dataclasses.replace(bundle, **changes)


class EvalSets:
    """The evaluation images prepared for each model (its input size, mean and std), decoded once per preparation.

    The same seeded subset is drawn every time, so models prepared differently still see the same images."""

    def __init__(self, data: str | None, *, test_subset: int | None, seed: int) -> None:
        self.data, self.test_subset, self.seed = data, test_subset, seed
        self._prepared: dict[tuple, tuple[DataBundle, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def for_model(self, model: nn.Module) -> tuple[DataBundle, list[tuple[torch.Tensor, torch.Tensor]]]:
        c = model.config
        key = (c.input_size[-1], tuple(c.mean), tuple(c.std))
        if key not in self._prepared:
            bundle = study_data(self.data, test_subset=self.test_subset, seed=self.seed, augment="none",
                                image_size=key[0], mean=c.mean, std=c.std)  # fmt: skip
            self._prepared[key] = bundle, eval_batches(evaluation_split(bundle)[1])
        return self._prepared[key]


def eval_batches(dataset: Any, batch_size: int = 500) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation set as a list of batches, decoded once and reused for many measurements."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    return [(x, y) for x, y in loader]


@torch.no_grad()
def accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
