"""Lesion study (Veit et al. 2016): residual networks behave like ensembles of shallow paths.

Deleting one residual block at test time (keeping its shortcut) barely hurts a ResNet, except where the
block changes resolution; deleting a layer of a plain net breaks the only path and accuracy collapses.
A ResNet of n blocks has C(n, k) paths of length k; most paths are of middle length, but sampling
single paths shows the gradient mostly comes from short ones.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from resnetlab.loading import load_model
from resnetlab.models import ResNet
from resnetlab.studies.common import accuracy, eval_batches, pyplot, study_data, study_dir, write_csv, write_report


@contextmanager
def lesioned(model: ResNet, indices: set[int]):
    """Temporarily delete the residual branch of the blocks at ``indices``."""
    blocks = model.blocks()
    try:
        for i in indices:
            blocks[i].lesioned = True
        yield model
    finally:
        for block in blocks:
            block.lesioned = False


def can_delete(model: ResNet, index: int) -> bool:
    """A block can go if something still carries its input forward: a shortcut that fits the output."""
    block = model.blocks()[index]
    return block.use_shortcut or block.downsample is not None or _keeps_shape(block)


def _keeps_shape(block: torch.nn.Module) -> bool:
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[0].in_channels == convs[-1].out_channels and all(c.stride == (1, 1) for c in convs)


def single_lesions(model: ResNet, batches: list) -> list[dict[str, Any]]:
    rows = []
    for i, block in enumerate(model.blocks()):
        downsampling = block.downsample is not None or not _keeps_shape(block)
        if not can_delete(model, i):
            rows.append(dict(block=i, downsampling=downsampling, accuracy=float("nan")))
            continue
        with lesioned(model, {i}):
            rows.append(dict(block=i, downsampling=downsampling, accuracy=accuracy(model, batches)))
    return rows


def random_lesions(model: ResNet, batches: list, ks: list[int], samples: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    deletable = [i for i in range(len(model.blocks())) if can_delete(model, i)]
    rows = []
    for k in ks:
        for _ in range(samples if k else 1):
            chosen = set(rng.sample(deletable, min(k, len(deletable))))
            with lesioned(model, chosen):
                rows.append(dict(k=k, accuracy=accuracy(model, batches)))
    return rows


def path_gradient_magnitudes(model: ResNet, batch: tuple[torch.Tensor, torch.Tensor], samples: int,
                             seed: int) -> list[dict[str, Any]]:  # fmt: skip
    """Veit et al., Sec. 5: mean gradient norm at the input through single paths of each length k.

    A path of length k goes through the residual branch of k blocks and the shortcut of all others.
    """
    rng = random.Random(seed)
    blocks = model.blocks()
    n = len(blocks)
    model.eval()
    x, y = batch
    rows = []
    for k in range(n + 1):
        norms = []
        for _ in range(samples):
            chosen = set(rng.sample(range(n), k))
            for i, block in enumerate(blocks):
                block.lesioned = i not in chosen
                block.use_shortcut = i not in chosen
            inputs = x.clone().requires_grad_(True)
            F.cross_entropy(model(inputs), y).backward()
            norms.append(inputs.grad.flatten(1).norm(dim=1).mean().item())
        rows.append(dict(length=k, paths=math.comb(n, k), gradient=sum(norms) / len(norms)))
    for block in blocks:
        block.lesioned, block.use_shortcut = False, True
    total = sum(r["paths"] * r["gradient"] for r in rows)
    for r in rows:
        r["path_fraction"] = r["paths"] / 2**n
        r["gradient_share"] = r["paths"] * r["gradient"] / total if total else 0.0
    return rows


def lesion_study(
    source: str,
    *,
    plain: str | None = None,
    pretrained: str | None = None,
    data: str | None = None,
    test_subset: int | None = 2000,
    ks: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12),
    samples: int = 5,
    path_samples: int = 3,
    out: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    folder = study_dir("lesion", out)
    model = load_model(source, pretrained=pretrained).eval()
    c = model.config
    bundle = study_data(data, test_subset=test_subset, seed=seed, augment="none", image_size=c.input_size[-1],
                        mean=c.mean, std=c.std)  # fmt: skip
    batches = eval_batches(bundle.test if bundle.test is not None else bundle.val)
    results: dict[str, Any] = {}
    nets = {"residual": model}
    if plain:
        nets["plain"] = load_model(plain).eval()
    rows, summary = [], {"data": bundle.name, "images": sum(len(y) for _, y in batches), "folder": str(folder)}
    for kind, net in nets.items():
        intact = accuracy(net, batches)
        single = single_lesions(net, batches)
        multi = random_lesions(net, batches, [k for k in ks if k <= len(net.blocks())], samples, seed)
        results[kind] = dict(intact=intact, single=single, multi=multi)
        rows += [dict(net=kind, kind="single", **r) for r in single] + [
            dict(net=kind, kind="random", **r) for r in multi
        ]
        kept = [r["accuracy"] for r in single if not r["downsampling"] and not math.isnan(r["accuracy"])]
        measured = [r["accuracy"] for r in single if not math.isnan(r["accuracy"])]
        summary[kind] = dict(
            model=net.name, intact=intact, chance=100 / net.config.num_classes,
            mean_single_lesion_nondownsampling=sum(kept) / len(kept) if kept else float("nan"),
            worst_single_lesion=min(measured, default=float("nan")),
        )  # fmt: skip
    paths = path_gradient_magnitudes(model, batches[0], path_samples, seed)
    write_csv(folder / "lesions.csv", rows)
    write_csv(folder / "paths.csv", paths)
    _plot(results, paths, folder / "lesion.png")
    n = len(model.blocks())
    effective = sorted(paths, key=lambda r: -r["gradient_share"])[:1][0]["length"]
    summary["paths"] = dict(blocks=n, most_gradient_at_length=effective,
                            mean_path_length=sum(r["length"] * r["path_fraction"] for r in paths))  # fmt: skip
    r = summary["residual"]
    paragraphs = [
        f"Model {r['model']} on {bundle.name} ({summary['images']} test images): intact {r['intact']:.2f}%; "
        f"deleting one non-downsampling block leaves {r['mean_single_lesion_nondownsampling']:.2f}% on average; "
        f"the worst single deletion leaves {r['worst_single_lesion']:.2f}%.",
    ]
    if "plain" in summary:
        p = summary["plain"]
        paragraphs.append(
            f"Plain net {p['model']}: intact {p['intact']:.2f}%; deleting one layer leaves "
            f"{p['mean_single_lesion_nondownsampling']:.2f}% on average (chance: {p['chance']:.1f}%)."
        )
    mean_length = summary["paths"]["mean_path_length"]
    paragraphs += [
        f"Paths: {n} blocks give 2^{n} paths, mean length {mean_length:.1f}; the largest share of the input "
        f"gradient comes from paths of length {effective}.",
        "![lesion](lesion.png)",
    ]
    write_report(folder, "Lesion study", paragraphs, summary)
    return summary


def _plot(results: dict[str, Any], paths: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for kind, res in results.items():
        single = res["single"]
        axes[0].plot([r["block"] for r in single], [r["accuracy"] for r in single], "o-", label=f"{kind}: one deleted")
        axes[0].axhline(res["intact"], ls=":", color=axes[0].lines[-1].get_color())
        ks = sorted({r["k"] for r in res["multi"]})
        means = [
            sum(r["accuracy"] for r in res["multi"] if r["k"] == k) / sum(r["k"] == k for r in res["multi"]) for k in ks
        ]
        axes[1].plot(ks, means, "o-", label=kind)
    axes[0].set_xlabel("deleted block")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].legend()
    axes[1].set_xlabel("number of blocks deleted at random")
    axes[1].set_ylabel("test accuracy (%)")
    axes[1].legend()
    lengths = [r["length"] for r in paths]
    axes[2].bar(lengths, [r["path_fraction"] for r in paths], alpha=0.4, label="share of paths")
    axes[2].plot(lengths, [r["gradient_share"] for r in paths], "o-", color="C3", label="share of gradient")
    axes[2].set_xlabel("path length (residual branches on the path)")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
