"""The degradation problem (He et al. 2015, Fig. 6): deeper plain nets train *worse*; residual nets do not.

Plain and residual twins of each depth are trained with the same recipe and seed; training error (thin,
dashed) and test error (bold) are drawn against iterations, plain nets left, residual nets right. The
report states what was measured and with what budget: a short run shows early training, not the paper's
comparison at convergence (64,000 iterations of batch 128).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from resnetlab.errors import ConfigError
from resnetlab.studies.common import evaluation_split, study_data, study_dir, write_csv, write_report
from resnetlab.studies.figures import data_caption, depth_colours, figure_legend, new_figure, save_figure
from resnetlab.train import RunDir, load_recipe, train

#: The paper's training budget for CIFAR-10 (He et al. 2015, section 4.2), in images seen.
PAPER_IMAGES_SEEN = 64_000 * 128


def degradation_study(
    depths: tuple[int, ...] = (20, 32, 44, 56),
    *,
    data: str | None = None,
    recipe: str = "demo",
    max_iters: int | None = None,
    subset: int | None = None,
    test_subset: int | None = None,
    eval_every: int = 0,
    out: str | Path | None = None,
    seed: int = 0,
    resume: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Train ``plain{d}`` and ``resnet{d}`` for each depth; returns the final errors and the budget.

    ``resume``: a model whose run folder in ``out`` has a checkpoint continues from it (a finished one is
    only collected), so an interrupted study picks up where it stopped."""
    if len(set(depths)) < 2:
        raise ConfigError(f"degradation compares depths: give at least two, e.g. --depths 20,56 (got {depths})")
    folder = study_dir("degradation", out)
    bundle = study_data(data, subset=subset, test_subset=test_subset, seed=seed)
    split, evaluation = evaluation_split(bundle)
    if max_iters:
        overrides["max_iters"] = max_iters
    if resume:
        overrides["auto_resume"] = True
    rows, curves, models, seconds, resumed = [], {}, {}, {}, []
    for family in ("plain", "resnet"):
        for depth in depths:
            name = f"{family}{depth}"
            cfg = load_recipe(recipe, model=name, data=data, seed=seed, run_dir=str(folder / name), progress=False,
                              tensorboard=False, eval_every=eval_every, **overrides)  # fmt: skip
            if resume and RunDir(folder / name).last.is_file():
                resumed.append(name)
            result = train(cfg, bundle=bundle)
            models[name], seconds[name] = str(result.model_dir), round(result.seconds, 1)
            history = [h for h in result.history if "eval_top1" in h]
            curves[name] = history
            for h in history:
                rows.append(dict(model=name, family=family, depth=depth, step=h["step"],
                                 train_error=100 - h["train_top1"], test_error=100 - h["eval_top1"]))  # fmt: skip
    write_csv(folder / "curves.csv", rows, ("model", "family", "depth", "step", "train_error", "test_error"))
    final = {name: _final_errors(history) for name, history in curves.items()}
    shallow, deep = min(depths), max(depths)
    plain_degrades = final[f"plain{deep}"]["train_error"] > final[f"plain{shallow}"]["train_error"]
    resnet_improves = final[f"resnet{deep}"]["train_error"] < final[f"resnet{shallow}"]["train_error"]
    iterations = max((h["step"] for history in curves.values() for h in history), default=0)
    budget = {"iterations": iterations, "batch_size": cfg.batch_size, "images_seen": iterations * cfg.batch_size,
              "epochs": iterations * cfg.batch_size / len(bundle.train),
              "fraction_of_paper_budget": iterations * cfg.batch_size / PAPER_IMAGES_SEEN}  # fmt: skip
    title = (f"Degradation: plain vs residual nets of {', '.join(map(str, sorted(depths)))} layers "
             f"({iterations} iterations of batch {cfg.batch_size}, {budget['epochs']:.2g} epochs)\n"
             f"training error on {data_caption(bundle.name, 'train', len(bundle.train))}; "
             f"test error on {data_caption(bundle.name, split, len(evaluation))}")  # fmt: skip
    save_figure(plot_degradation(curves, depths, title, batch_size=cfg.batch_size), folder / "degradation.png")
    summary = {"depths": list(depths), "final": {n: {k: v if math.isfinite(v) else None for k, v in errors.items()}
                                                 for n, errors in final.items()},
               "plain_deeper_trains_worse": plain_degrades, "resnet_deeper_trains_better": resnet_improves,
               "budget": budget, "data": bundle.name, "train_images": len(bundle.train), "split": split,
               "test_images": len(evaluation), "recipe": recipe, "iterations": cfg.max_iters,
               "batch_size": cfg.batch_size, "lr": cfg.lr, "seconds_this_call": seconds, "resumed": resumed,
               "models": models, "folder": str(folder)}  # fmt: skip
    table = "| model | final training error | final test error |\n|---|---|---|\n" + "\n".join(
        f"| {name} | {v['train_error']:.2f}% | {v['test_error']:.2f}% |" for name, v in final.items()
    )
    write_report(folder, "Degradation study", [
        f"Data: {bundle.name}, {len(bundle.train)} training images, {split} error on {len(evaluation)} images; "
        f"recipe {recipe!r}, batch {cfg.batch_size}, lr {cfg.lr}, seed {seed}. Training error: the running "
        "error on the (augmented) training batches since the previous evaluation, as in the paper's curves; "
        "'final' is the mean of the last 3 evaluations.",
        _measured(final, shallow, deep, budget), table,
    ], summary, figures=["degradation.png"])  # fmt: skip
    return summary


def _measured(final: dict[str, dict[str, float]], shallow: int, deep: int, budget: dict[str, Any]) -> str:
    """What was measured, with its budget: the final training errors of the shallowest and deepest twins,
    and how far this budget is from the paper's (no verdict a short run cannot support)."""

    def pair(family: str, label: str) -> str:
        a, b = final[f"{family}{shallow}"]["train_error"], final[f"{family}{deep}"]["train_error"]
        return f"{label}-{shallow} {a:.2f}%, {label}-{deep} {b:.2f}% ({b - a:+.2f} points for the deeper net)"

    return (f"Measured after {budget['iterations']} iterations of batch {budget['batch_size']} "
            f"({budget['images_seen']:,} images, {budget['epochs']:.2g} epochs): final training error "
            f"{pair('plain', 'plain')}; {pair('resnet', 'ResNet')}. This is "
            f"{100 * budget['fraction_of_paper_budget']:.2g}% of the paper's training (64,000 iterations of batch "
            "128): it shows early training only, and says nothing about which net trains better at convergence, "
            "where the paper compares them.")  # fmt: skip


def _final_errors(history: list[dict[str, Any]], last: int = 3) -> dict[str, float]:
    """Mean of the last few evaluations, so one noisy point does not decide the verdict (NaN: none ran)."""
    tail = history[-last:]
    if not tail:
        return {"train_error": math.nan, "test_error": math.nan}
    return {"train_error": sum(100 - h["train_top1"] for h in tail) / len(tail),
            "test_error": sum(100 - h["eval_top1"] for h in tail) / len(tail)}  # fmt: skip


def plot_degradation(curves: dict[str, list[dict[str, Any]]], depths: tuple[int, ...], title: str, *,
                     batch_size: int) -> Any:  # fmt: skip
    """Error against iterations, plain nets left and residual nets right: a colour per depth (the same for
    the twins), training error thin and dashed, test error bold; the key beside the panels."""
    from matplotlib.lines import Line2D

    fig, axes = new_figure(title, 1, 2, size=(13, 4.8), sharey=True)
    colours = depth_colours(depths)
    for ax, family in zip(axes[0], ("plain", "resnet")):
        for depth in sorted(depths):
            history = curves[f"{family}{depth}"]
            steps = [h["step"] for h in history]
            ax.plot(steps, [100 - h["train_top1"] for h in history], color=colours[depth], lw=1.1, ls="--")
            ax.plot(steps, [100 - h["eval_top1"] for h in history], color=colours[depth], lw=2.4)
        ax.set_title("plain networks" if family == "plain" else "residual networks (ResNet)")
        ax.set_xlabel(f"training iterations (batches of {batch_size} images)")
        ax.set_ylabel("error (%)")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colours[d], lw=2.4, label=f"{d} layers") for d in sorted(depths)]
    handles += [Line2D([], [], color="black", lw=1.1, ls="--", label="training error"),
                Line2D([], [], color="black", lw=2.4, label="test error")]  # fmt: skip
    figure_legend(fig, handles, fontsize=9)
    return fig
