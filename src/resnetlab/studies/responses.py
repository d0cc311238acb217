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
from resnetlab.studies.common import EvalSets, pyplot, study_dir, write_csv, write_report


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
    _plot(results, folder / "responses.png")
    summary = {name: {"layers": len(s), "mean_std": sum(s) / len(s), "max_std": max(s)} for name, s in results.items()}
    table = "| model | layers | mean response std | largest |\n|---|---|---|---|\n" + "\n".join(
        f"| {n} | {v['layers']} | {v['mean_std']:.3f} | {v['max_std']:.3f} |" for n, v in summary.items()
    )
    write_report(folder, "Layer responses", [
        f"Data: {bundle.name if bundle else '-'}; std of each 3x3 layer's normalised output over the test images.",
        table, "![responses](responses.png)",
    ], {"models": summary, "folder": str(folder)})  # fmt: skip
    return {"models": summary, "folder": str(folder)}


def _plot(results: dict[str, list[float]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(9, 6.5))
    for name, stds in results.items():
        axes[0].plot(range(1, len(stds) + 1), stds, lw=1.2, label=name)
        axes[1].plot(range(1, len(stds) + 1), sorted(stds, reverse=True), lw=1.2, label=name)
    axes[0].set_xlabel("layer index (original order)")
    axes[1].set_xlabel("layer index (sorted by magnitude)")
    for ax in axes:
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
