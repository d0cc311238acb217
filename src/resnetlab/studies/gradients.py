"""Gradient flow: per-layer gradient norms of plain and residual twins, at initialisation and in training.

The shortcut is a gradient highway: through a residual block the Jacobian is I + dF/dx, so the gradient
reaching the first layers keeps its scale whatever the depth. Through a plain stack it is a product of
per-layer Jacobians: without normalisation it vanishes (the classic picture); with BatchNorm in training
mode it explodes instead (He et al. note BN keeps it from vanishing; Yang et al. 2019 show the explosion).
Both settings are measured. The heat map shows log10 of each conv layer's gradient norm over training.

At 1202 layers a plain net's gradient outgrows float32 (about 1e76 at the first layer): a measurement whose
norms are not finite is repeated in float64, and one still not finite is reported as an overflow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models import create_model
from resnetlab.studies.common import pyplot, study_data, study_dir, write_csv, write_report
from resnetlab.studies.figures import (
    FAMILY_STYLE,
    data_caption,
    depth_colours,
    figure_legend,
    line_style,
    new_figure,
    save_figure,
    style_key,
    twin,
)
from resnetlab.train import StepInfo, TrainingDiverged, load_recipe, train


def conv_gradient_norms(model: nn.Module) -> list[float]:
    """L2 norm of the gradient of every conv weight, input to output (in float64: large norms stay finite)."""
    return [m.weight.grad.double().norm().item() if m.weight.grad is not None else 0.0
            for m in model.modules() if isinstance(m, nn.Conv2d)]  # fmt: skip


def gradients_at_init(
    name: str, batch: tuple[torch.Tensor, torch.Tensor], seed: int = 0, **options: Any
) -> list[float]:
    """One forward/backward of a freshly initialised model on ``batch`` (train mode, as in step one).

    If a norm is not finite in float32 the same model (same seed) is measured again in float64; values
    that still are not finite (inf/NaN) are returned as they are, for the caller to report as overflow.
    """
    return _at_init(name, batch, seed, options)[0]


def _at_init(name: str, batch: tuple[torch.Tensor, torch.Tensor], seed: int,
             options: dict[str, Any]) -> tuple[list[float], torch.dtype]:  # fmt: skip
    """``gradients_at_init`` and the precision that measured it."""
    grads = _one_backward(name, batch, seed, torch.float32, options)
    if all(math.isfinite(g) for g in grads):
        return grads, torch.float32
    return _one_backward(name, batch, seed, torch.float64, options), torch.float64


def _one_backward(name: str, batch: tuple[torch.Tensor, torch.Tensor], seed: int, dtype: torch.dtype,
                  options: dict[str, Any]) -> list[float]:  # fmt: skip
    torch.manual_seed(seed)
    x, y = batch
    model = create_model(name, num_classes=int(y.max()) + 1 if len(y) else 10, in_chans=x.shape[1], **options)
    model.to(dtype).train()
    F.cross_entropy(model(x.to(dtype)), y).backward()
    return conv_gradient_norms(model)


def first_over_last(norms: list[float]) -> float:
    """Gradient norm of the first conv layer over the last's: >> 1 explodes towards the input, << 1 vanishes.

    NaN when either norm overflowed (is not finite), inf when the last layer got no gradient at all."""
    first, last = norms[0], norms[-1]
    if not (math.isfinite(first) and math.isfinite(last)):
        return math.nan
    return first / last if last else math.inf


def gradients_study(
    depths: tuple[int, ...] = (20, 56, 110),
    *,
    norms: tuple[str, ...] = ("batchnorm", "none"),
    data: str | None = None,
    train_steps: int = 0,
    train_depths: tuple[int, ...] | None = None,
    record_every: int = 5,
    batch_size: int = 64,
    subset: int | None = None,
    recipe: str = "demo",
    out: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Gradient norms per layer for plain{d} and resnet{d}: at init, and (``train_steps`` > 0) while training.

    ``train_depths``: the depths trained (default: all of ``depths``); e.g. measure 1202 layers at init only.
    """
    train_depths = tuple(depths) if train_depths is None else tuple(train_depths)
    if train_steps and not set(train_depths) <= set(depths):
        raise ConfigError(f"train depths {sorted(set(train_depths) - set(depths))} are not among depths {depths}")
    if record_every < 1:
        raise ConfigError(f"record_every must be at least 1, got {record_every}")
    folder = study_dir("gradients", out)
    # the training runs here are for measuring gradients: a small test subset keeps their final eval cheap
    bundle = study_data(data, subset=subset, test_subset=500, seed=seed, augment="none")
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    batch = next(iter(loader))
    rows, at_init, during, diverged, in_float64 = [], {}, {}, {}, []
    for norm in norms:
        for depth in depths:
            for family in ("plain", "resnet"):
                name = f"{family}{depth}"
                grads, dtype = _at_init(name, batch, seed, {"norm_layer": norm})
                at_init[f"{name}/{norm}"] = grads
                if dtype == torch.float64:
                    in_float64.append(f"{name}/{norm}")
                rows += [dict(model=name, norm=norm, step=0, layer=i, grad_norm=g) for i, g in enumerate(grads)]
    for depth in train_depths if train_steps else ():
        for family in ("plain", "resnet"):
            name = f"{family}{depth}"
            trace: list[tuple[int, list[float]]] = []

            def record(info: StepInfo, trace: list = trace) -> None:
                if info.step == 1 or info.step % record_every == 0:
                    trace.append((info.step, conv_gradient_norms(info.model)))

            cfg = load_recipe(recipe, model=name, max_iters=train_steps, batch_size=batch_size, seed=seed,
                              run_dir=str(folder / name), progress=False, tensorboard=False,
                              eval_every=train_steps, warmup_iters=0)  # fmt: skip
            try:
                train(cfg, bundle=bundle, callbacks=[record])
            except TrainingDiverged as err:  # keep what was recorded up to the divergence
                diverged[name] = str(err)
            during[name] = trace
            rows += [dict(model=name, norm="batchnorm", step=s, layer=i, grad_norm=g)
                     for s, grads in trace for i, g in enumerate(grads)]  # fmt: skip
    ratio_rows = [dict(model=name.split("/")[0], norm=name.split("/")[1], step=0, first_layer=g[0], last_layer=g[-1],
                       first_over_last=first_over_last(g)) for name, g in at_init.items()]  # fmt: skip
    ratio_rows += [dict(model=name, norm="batchnorm", step=s, first_layer=g[0], last_layer=g[-1],
                        first_over_last=first_over_last(g))
                   for name, trace in during.items() for s, g in trace]  # fmt: skip
    write_csv(folder / "gradients.csv", rows, ("model", "norm", "step", "layer", "grad_norm"))
    ratio_fields = ("model", "norm", "step", "first_layer", "last_layer", "first_over_last")
    write_csv(folder / "ratios.csv", ratio_rows, ratio_fields)
    ratios = {name: first_over_last(grads) for name, grads in at_init.items()}
    first = {name: grads[0] for name, grads in at_init.items()}
    overflow = sorted(name for name, grads in at_init.items() if not all(math.isfinite(g) for g in grads))
    caption = data_caption(bundle.name, "train", len(bundle.train))
    title = (f"Gradient norm of each conv layer at initialisation: plain vs residual twins\n"
             f"one batch of {len(batch[1])} images from {caption}; cross-entropy loss, train mode")  # fmt: skip
    save_figure(plot_gradients_at_init(at_init, norms, depths, title), folder / "gradients_at_init.png")
    figures = ["gradients_at_init.png"]
    if during:
        title = (f"Gradient norms during {train_steps} training steps (batch {batch_size}, recipe {recipe!r})\n"
                 f"{caption}")  # fmt: skip
        save_figure(plot_gradients_training(during, title), folder / "gradients_training.png")
        figures.append("gradients_training.png")
    training = {name: _training_ratios(trace) for name, trace in during.items()}
    summary = {"first_over_last_at_init": _finite_or_none(ratios), "first_layer_at_init": _finite_or_none(first),
               "overflow_at_init": overflow, "float64_at_init": in_float64,
               "first_over_last_during_training": training, "diverged": diverged,
               "depths": list(depths), "train_depths": list(train_depths) if train_steps else [],
               "train_steps": train_steps, "batch_size": batch_size, "data": bundle.name,
               "folder": str(folder)}  # fmt: skip
    table = "| model / norm | first-layer gradient norm | first / last layer |\n|---|---|---|\n" + "\n".join(
        f"| {n} | {_fmt(first[n])} | {_fmt(r)} |" for n, r in ratios.items()
    )
    paragraphs = [
        f"Data: {bundle.name}; one batch of {batch_size} images at initialisation"
        + (f", then {train_steps} training steps of depths {', '.join(map(str, train_depths))}." if train_steps
           else "."),
        table,
    ]  # fmt: skip
    if in_float64:
        paragraphs.append(f"Not finite in float32, measured again in float64: {', '.join(in_float64)}.")
    if overflow:
        paragraphs.append(f"Overflow (gradient norms not finite even in float64): {', '.join(overflow)}.")
    if training:
        paragraphs.append("First / last layer during training (first recorded step -> last; median):\n\n"
                          "| model | first step | last step | median |\n|---|---|---|---|\n" + "\n".join(
            f"| {n} | {_fmt(v['first'])} | {_fmt(v['last'])} | {_fmt(v['median'])} |" for n, v in training.items()
        ))  # fmt: skip
    if diverged:
        paragraphs.append("Diverged (training stopped, the steps before it are kept): " + "; ".join(
            f"{n}: {message}" for n, message in diverged.items()))  # fmt: skip
    write_report(folder, "Gradient flow study", paragraphs, summary, figures)
    return summary


def _training_ratios(trace: list[tuple[int, list[float]]]) -> dict[str, float | None]:
    values = [first_over_last(grads) for _, grads in trace]
    finite = sorted(v for v in values if math.isfinite(v))
    median = finite[len(finite) // 2] if finite else math.nan
    return _finite_or_none({"first": values[0] if values else math.nan, "last": values[-1] if values else math.nan,
                            "median": median})  # fmt: skip


def _finite_or_none(values: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN/inf: an overflowed figure becomes null (the report says "overflow")."""
    return {k: v if math.isfinite(v) else None for k, v in values.items()}


def _fmt(value: float | None) -> str:
    return "overflow" if value is None or not math.isfinite(value) else f"{value:.3g}"


_NORM_WORDS = {"batchnorm": "BatchNorm", "none": "no normalisation", "groupnorm": "GroupNorm"}


def plot_gradients_at_init(at_init: dict[str, list[float]], norms: tuple[str, ...], depths: tuple[int, ...],
                           title: str) -> Any:  # fmt: skip
    """One panel per depth (columns) and norm layer (rows), each on its own log scale, so that the
    differences at 20 layers are not flattened by the 1e76 of a 1202-layer plain net. In a panel the twins
    share the depth's colour: plain dashed, residual solid. Each title gives the first/last layer ratios."""
    depths = tuple(sorted(depths))
    fig, axes = new_figure(title, len(norms), len(depths), size=(3.9 * len(depths) + 1.6, 3.3 * len(norms) + 0.8))
    colours = depth_colours(depths)
    for row, norm in zip(axes, norms):
        for ax, depth in zip(row, depths):
            ratios = []
            for family in ("plain", "resnet"):
                name = f"{family}{depth}"
                grads = at_init.get(f"{name}/{norm}")
                if grads is None:
                    continue
                finite = [g if math.isfinite(g) and g > 0 else math.nan for g in grads]
                ax.semilogy(range(1, len(grads) + 1), finite, **line_style(name, colours, 0), lw=1.4)
                ratios.append(f"{FAMILY_STYLE[family]['word']} {_fmt(first_over_last(grads))}")
            ax.set_title(f"{depth} layers, {_NORM_WORDS.get(norm, norm)}\nfirst / last layer: {', '.join(ratios)}",
                         fontsize=9)  # fmt: skip
            ax.set_xlabel("conv layer (1: next to the input)")
            ax.set_ylabel("gradient L2 norm (log scale)")
            ax.grid(alpha=0.3, which="both")
    figure_legend(fig, style_key(lw=1.4), fontsize=9, title="colour: depth")
    return fig


def _log_grids(during: dict[str, list[tuple[int, list[float]]]]) -> tuple[dict[str, torch.Tensor], float, float]:
    """log10 gradient norm per model as (layer, step), NaN where a norm is zero or not finite, and the range
    of the finite values over all models (one colour scale, so the panels compare)."""
    grids = {}
    for name, trace in during.items():
        values = torch.tensor([norms for _, norms in trace], dtype=torch.float64)
        values[~torch.isfinite(values) | (values <= 0)] = math.nan
        grids[name] = values.log10().T
    finite = torch.cat([g[torch.isfinite(g)] for g in grids.values()])
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (-1.0, 1.0)
    return grids, low, high


def plot_gradients_training(during: dict[str, list[tuple[int, list[float]]]], title: str) -> Any:
    """One heat map per model (log10 gradient norm, layer x step) on a shared colour range taken from the
    data, and the first/last ratio against steps (twins share a colour: plain dashed, residual solid).
    Zero or non-finite norms are drawn grey."""
    plt = pyplot()
    names = list(during)
    grids, low, high = _log_grids(during)
    cmap = plt.get_cmap("magma").with_extremes(bad="lightgrey")
    fig = plt.figure(figsize=(max(2.6 * len(names), 8) + 1.5, 8), layout="constrained")
    fig.suptitle(title, fontsize=11)
    top, bottom = fig.subfigures(2, 1, height_ratios=(1.15, 1))
    axes = top.subplots(1, len(names), squeeze=False)[0]
    image = None
    for ax, name in zip(axes, names):
        steps = [s for s, _ in during[name]]
        grid = grids[name]
        image = ax.imshow(grid.numpy(), aspect="auto", origin="lower", cmap=cmap, vmin=low, vmax=max(high, low + 1e-9),
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, 0, grid.shape[0]))  # fmt: skip
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.set_ylabel("conv layer (input at the bottom)")
        ax.yaxis.get_major_locator().set_params(integer=True)
    if image is not None:
        top.colorbar(image, ax=list(axes), label="log10 of the gradient L2 norm")
    ratio_ax = bottom.subplots()
    colours = depth_colours(parsed[1] for parsed in map(twin, names) if parsed)
    for index, name in enumerate(names):
        ratios = [first_over_last(g) for _, g in during[name]]
        ratio_ax.semilogy([s for s, _ in during[name]], [r if math.isfinite(r) and r > 0 else math.nan for r in ratios],
                          **line_style(name, colours, index), label=name)  # fmt: skip
    ratio_ax.set_title("gradient norm of the first conv layer / the last (1: same scale; far above: explodes "
                       "towards the input; far below: vanishes)", fontsize=9)  # fmt: skip
    ratio_ax.set_xlabel("training step")
    ratio_ax.set_ylabel("first / last layer (ratio, log scale)")
    ratio_ax.grid(alpha=0.3, which="both")
    ratio_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return fig
