"""The degradation problem (He et al. 2015, Fig. 6): deeper plain nets train *worse*; residual nets do not.

Plain and residual twins of each depth are trained with the same recipe and seed; training error (thin)
and test error (bold) are drawn against iterations, plain nets left, residual nets right.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from resnetlab.errors import ConfigError
from resnetlab.studies.common import pyplot, study_data, study_dir, write_csv, write_report
from resnetlab.train import RunDir, load_recipe, train


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
    """Train ``plain{d}`` and ``resnet{d}`` for each depth; returns the final errors and the verdict.

    ``resume``: a model whose run folder in ``out`` has a checkpoint continues from it (a finished one is
    only collected), so an interrupted study picks up where it stopped."""
    if len(set(depths)) < 2:
        raise ConfigError(f"degradation compares depths: give at least two, e.g. --depths 20,56 (got {depths})")
    folder = study_dir("degradation", out)
    bundle = study_data(data, subset=subset, test_subset=test_subset, seed=seed)
    evaluation = bundle.test if bundle.test is not None else bundle.val
    if evaluation is None:
        raise ConfigError(f"{bundle.name} has no test or validation split: the study needs test errors")
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
    _plot(curves, depths, folder / "degradation.png")
    summary = {"depths": list(depths), "final": {n: {k: v if math.isfinite(v) else None for k, v in errors.items()}
                                                 for n, errors in final.items()},
               "plain_deeper_trains_worse": plain_degrades, "resnet_deeper_trains_better": resnet_improves,
               "data": bundle.name, "train_images": len(bundle.train), "test_images": len(evaluation),
               "recipe": recipe, "iterations": cfg.max_iters, "batch_size": cfg.batch_size, "lr": cfg.lr,
               "seconds_this_call": seconds, "resumed": resumed, "models": models, "folder": str(folder)}  # fmt: skip
    table = "| model | final training error | final test error |\n|---|---|---|\n" + "\n".join(
        f"| {name} | {v['train_error']:.2f}% | {v['test_error']:.2f}% |" for name, v in final.items()
    )
    verdict = (f"Plain-{deep} {'has a HIGHER' if plain_degrades else 'does not have a higher'} training error "
               f"than plain-{shallow} (degradation {'observed' if plain_degrades else 'not observed'}); "
               f"ResNet-{deep} {'has a lower' if resnet_improves else 'does not have a lower'} training error than "
               f"ResNet-{shallow}.")  # fmt: skip
    write_report(folder, "Degradation study", [
        f"Data: {bundle.name}, {len(bundle.train)} training images, test error on {len(evaluation)} images; "
        f"recipe {recipe!r} ({cfg.max_iters or f'{cfg.epochs} epochs of'} iterations, batch {cfg.batch_size}, "
        f"lr {cfg.lr}), seed {seed}. Training error: the running error on the (augmented) training batches since "
        "the previous evaluation, as in the paper's curves; 'final' is the mean of the last 3 evaluations.",
        verdict, table, "![degradation](degradation.png)",
    ], summary)  # fmt: skip
    return summary


def _final_errors(history: list[dict[str, Any]], last: int = 3) -> dict[str, float]:
    """Mean of the last few evaluations, so one noisy point does not decide the verdict (NaN: none ran)."""
    tail = history[-last:]
    if not tail:
        return {"train_error": math.nan, "test_error": math.nan}
    return {"train_error": sum(100 - h["train_top1"] for h in tail) / len(tail),
            "test_error": sum(100 - h["eval_top1"] for h in tail) / len(tail)}  # fmt: skip


def _plot(curves: dict[str, list[dict[str, Any]]], depths: tuple[int, ...], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    colors = plt.cm.viridis([i / max(len(depths) - 1, 1) for i in range(len(depths))])
    for ax, family in zip(axes, ("plain", "resnet")):
        for depth, color in zip(depths, colors):
            history = curves[f"{family}{depth}"]
            steps = [h["step"] for h in history]
            ax.plot(steps, [100 - h["train_top1"] for h in history], color=color, lw=0.9, ls="--")
            ax.plot(steps, [100 - h["eval_top1"] for h in history], color=color, lw=2.2,
                    label=f"{'plain' if family == 'plain' else 'ResNet'}-{depth}")  # fmt: skip
        ax.set_title("plain networks" if family == "plain" else "residual networks")
        ax.set_xlabel("iterations")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("error (%)  — dashed: training, bold: test")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
