"""Gradient flow: per-layer gradient norms of plain and residual twins, at initialisation and in training.

The shortcut is a gradient highway: through a residual block the Jacobian is I + dF/dx, so the gradient
reaching the first layers keeps its scale whatever the depth. Through a plain stack it is a product of
per-layer Jacobians: without normalisation it vanishes (the classic picture); with BatchNorm in training
mode it explodes instead (He et al. note BN keeps it from vanishing; Yang et al. 2019 show the explosion).
Both settings are measured. The heat map shows log10 of each conv layer's gradient norm over training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.models import create_model
from resnetlab.studies.common import pyplot, study_data, study_dir, write_csv, write_report
from resnetlab.train import StepInfo, load_recipe, train


def conv_gradient_norms(model: nn.Module) -> list[float]:
    """L2 norm of the gradient of every conv weight, input to output."""
    return [m.weight.grad.norm().item() if m.weight.grad is not None else 0.0
            for m in model.modules() if isinstance(m, nn.Conv2d)]  # fmt: skip


def gradients_at_init(
    name: str, batch: tuple[torch.Tensor, torch.Tensor], seed: int = 0, **options: Any
) -> list[float]:
    """One forward/backward of a freshly initialised model on ``batch`` (train mode, as in step one)."""
    torch.manual_seed(seed)
    x, y = batch
    model = create_model(name, num_classes=int(y.max()) + 1 if len(y) else 10, in_chans=x.shape[1], **options)
    model.train()
    F.cross_entropy(model(x), y).backward()
    return conv_gradient_norms(model)


def gradients_study(
    depths: tuple[int, ...] = (20, 56, 110),
    *,
    norms: tuple[str, ...] = ("batchnorm", "none"),
    data: str | None = None,
    train_steps: int = 0,
    record_every: int = 5,
    batch_size: int = 64,
    subset: int | None = None,
    recipe: str = "demo",
    out: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Gradient norms per layer for plain{d} and resnet{d}: at init, and (``train_steps`` > 0) while training."""
    folder = study_dir("gradients", out)
    # the training runs here are for measuring gradients: a small test subset keeps their final eval cheap
    bundle = study_data(data, subset=subset, test_subset=500, seed=seed, augment="none")
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    batch = next(iter(loader))
    rows, at_init, during = [], {}, {}
    for norm in norms:
        for depth in depths:
            for family in ("plain", "resnet"):
                name = f"{family}{depth}"
                grads = gradients_at_init(name, batch, seed, norm_layer=norm)
                at_init[f"{name}/{norm}"] = grads
                rows += [dict(model=name, norm=norm, step=0, layer=i, grad_norm=g) for i, g in enumerate(grads)]
    for depth in depths if train_steps else ():
        for family in ("plain", "resnet"):
            name = f"{family}{depth}"
            if train_steps:
                trace: list[tuple[int, list[float]]] = []

                def record(info: StepInfo, trace: list = trace) -> None:
                    if info.step == 1 or info.step % record_every == 0:
                        trace.append((info.step, conv_gradient_norms(info.model)))

                cfg = load_recipe(recipe, model=name, max_iters=train_steps, batch_size=batch_size, seed=seed,
                                  run_dir=str(folder / name), progress=False, tensorboard=False,
                                  eval_every=train_steps, warmup_iters=0)  # fmt: skip
                train(cfg, bundle=bundle, callbacks=[record])
                during[name] = trace
                rows += [dict(model=name, norm="batchnorm", step=s, layer=i, grad_norm=g)
                         for s, grads in trace for i, g in enumerate(grads)]  # fmt: skip
    write_csv(folder / "gradients.csv", rows)
    ratios = {name: _ratio(grads) for name, grads in at_init.items()}
    first = {name: grads[0] for name, grads in at_init.items()}
    _plot_init(at_init, norms, folder / "gradients_at_init.png")
    if during:
        _plot_heatmaps(during, folder / "gradients_training.png")
    summary = {"first_over_last_at_init": ratios, "first_layer_at_init": first, "depths": list(depths),
               "data": bundle.name, "folder": str(folder)}  # fmt: skip
    table = "| model / norm | first-layer gradient norm | first / last layer |\n|---|---|---|\n" + "\n".join(
        f"| {n} | {first[n]:.3g} | {r:.3g} |" for n, r in ratios.items()
    )
    write_report(folder, "Gradient flow study", [
        f"Data: {bundle.name}; one batch of {batch_size} images at initialisation"
        + (f", then {train_steps} training steps." if train_steps else "."),
        table, "![at init](gradients_at_init.png)", *(["![training](gradients_training.png)"] if during else []),
    ], summary)  # fmt: skip
    return summary


def _ratio(norms: list[float]) -> float:
    return norms[0] / norms[-1] if norms[-1] else math.inf


def _plot_init(at_init: dict[str, list[float]], norms: tuple[str, ...], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(norms), figsize=(7 * len(norms), 4.2), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        for name, grads in at_init.items():
            if name.endswith(f"/{norm}"):
                ax.semilogy(range(len(grads)), grads, ls="-" if name.startswith("resnet") else "--",
                            label=name.split("/")[0])  # fmt: skip
        ax.set_title(f"at initialisation, norm layer: {norm}")
        ax.set_xlabel("conv layer (input -> output)")
        ax.set_ylabel("gradient norm")
        ax.grid(alpha=0.3, which="both")
        ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_heatmaps(during: dict[str, list[tuple[int, list[float]]]], path: Path) -> None:
    plt = pyplot()
    names = list(during)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        steps = [s for s, _ in during[name]]
        grid = torch.tensor([norms for _, norms in during[name]]).clamp(min=1e-12).log10().T
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", vmin=-6, vmax=1,
                          extent=(steps[0], steps[-1], 0, grid.shape[0]))  # fmt: skip
        ax.set_title(name)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("conv layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="log10 gradient norm")
    fig.savefig(path, dpi=110)
    plt.close(fig)
