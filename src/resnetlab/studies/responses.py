"""Response strength (He et al. 2015, Fig. 7): standard deviation of each 3x3 layer's output, after its
norm and before the nonlinearity or addition. Residual functions are small (closer to zero than plain
layers' responses), and smaller in deeper nets: each block changes the signal only a little.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.errors import ConfigError
from resnetlab.models import ResNet
from resnetlab.sources import common_data, resolve_source
from resnetlab.studies.common import EvalSets, evaluation_split, study_dir, write_csv, write_report
from resnetlab.studies.figures import (
    data_caption,
    depth_colours,
    legend_outside,
    line_style,
    new_figure,
    save_figure,
    twin,
)

#: What each value is, for the report and the figure's axis.
RESPONSE_STD = (
    "std of each 3x3 layer's response after its BN (per channel over images and positions, mean over channels)"
)


def response_layers(model: ResNet) -> list[nn.Module]:
    """The module whose output is each 3x3 layer's response, input to output (He et al. 2015, Fig. 7).

    Post-activation blocks: the norm right after each 3x3 conv of the residual branch (``convN`` -> ``bnN``),
    i.e. after BN, before the ReLU or the addition. Pre-activation blocks: the 3x3 conv itself (its output
    goes to the next norm or to the addition). The shortcut's projection and the bottlenecks' 1x1 layers
    are not responses of a 3x3 layer and are left out.
    """
    layers = []
    for block in model.blocks():
        for name, module in block.named_children():
            if not (name.startswith("conv") and isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3)):
                continue
            if block.preact:
                layers.append(module)
                continue
            norm = getattr(block, "bn" + name.removeprefix("conv"), None)
            if norm is None:
                raise ConfigError(f"{type(block).__name__}.{name} has no matching norm layer bn{name[4:]}")
            layers.append(norm)
    return layers


@torch.no_grad()
def layer_response_stds(model: ResNet, batches: list) -> list[float]:
    """Std of each 3x3 layer's response (see ``response_layers``) over ``batches``, input to output.

    Per channel over images and positions, then averaged over channels.
    """
    norms = response_layers(model)
    sums = [torch.zeros(()) for _ in norms]
    squares = [torch.zeros(()) for _ in norms]
    counts = [0 for _ in norms]

    def hook(index: int):
        def record(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # std per channel over images and positions, then averaged over channels
            values = output.transpose(0, 1).flatten(1).double()
            sums[index] = sums[index] + values.sum(1)
            squares[index] = squares[index] + (values**2).sum(1)
            counts[index] += values.shape[1]

        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(norms)]
    model.eval()
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    stds = []
    for s, q, n in zip(sums, squares, counts):
        variance = (q / n - (s / n) ** 2).clamp(min=0)
        stds.append(float(variance.sqrt().mean()))
    return stds


def responses_study(
    sources: list[str],
    *,
    pretrained: str | bool | None = None,
    random_init: bool = False,
    data: str | None = None,
    test_subset: int | None = 1000,
    out: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Layer responses of each model in ``sources`` (run folders, model folders, checkpoints or names)."""
    if not sources:
        raise ConfigError("responses needs at least one model (--from)")
    folder = study_dir("responses", out)
    results, rows, bundle = {}, [], None
    resolved = [resolve_source(source, pretrained=pretrained) for source in sources]
    data = common_data(resolved, data, "study responses")  # default: the data the models were trained on
    eval_sets = EvalSets(data, test_subset=test_subset, seed=seed)
    for source, found in zip(sources, resolved):
        model = found.load_resnet(random_init=random_init).eval()
        bundle, batches = eval_sets.for_model(model)
        stds = layer_response_stds(model, batches)
        label = f"{model.name}" if model.name not in results else f"{model.name} ({source})"
        results[label] = stds
        rows += [dict(model=label, layer=i, std=s) for i, s in enumerate(stds)]
    write_csv(folder / "responses.csv", rows, ("model", "layer", "std"))
    split = evaluation_split(bundle)[0]
    caption = data_caption(bundle.name, split, sum(len(y) for _, y in batches))
    title = f"Layer responses of {', '.join(results)}\n{caption}"
    save_figure(plot_responses(results, title), folder / "responses.png")
    models = {name: {"layers": len(s), "mean_std": sum(s) / len(s), "max_std": max(s)} for name, s in results.items()}
    table = "| model | layers | mean response std | largest |\n|---|---|---|---|\n" + "\n".join(
        f"| {n} | {v['layers']} | {v['mean_std']:.3f} | {v['max_std']:.3f} |" for n, v in models.items()
    )
    summary = {"models": models, "data": bundle.name, "split": split, "folder": str(folder)}
    write_report(folder, "Layer responses", [f"Data: {caption}; {RESPONSE_STD}.", table], summary,
                 figures=["responses.png"])  # fmt: skip
    return summary


def plot_responses(results: dict[str, list[float]], title: str) -> Any:
    """Each model's response stds in network order (top) and sorted by size (bottom); plain/resnet twins
    share a colour per depth (plain dashed, residual solid)."""
    fig, axes = new_figure(title, 2, 1, size=(11, 7.5))
    colours = depth_colours(parsed[1] for parsed in map(twin, results) if parsed)
    for index, (name, stds) in enumerate(results.items()):
        style = line_style(name, colours, index)
        axes[0][0].plot(range(1, len(stds) + 1), stds, lw=1.3, label=name, **style)
        axes[1][0].plot(range(1, len(stds) + 1), sorted(stds, reverse=True), lw=1.3, label=name, **style)
    axes[0][0].set_title("in network order")
    axes[0][0].set_xlabel("3x3 layer (1: next to the input)")
    axes[1][0].set_title("sorted by size")
    axes[1][0].set_xlabel("rank of the layer (1: largest response)")
    for (ax,) in axes:
        ax.set_ylabel("std of the layer's response\nafter BN (normalised units)")
        ax.grid(alpha=0.3)
        legend_outside(ax, fontsize=8)
    return fig
