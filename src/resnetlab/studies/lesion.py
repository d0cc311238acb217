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

from resnetlab.errors import ConfigError
from resnetlab.models import ResNet
from resnetlab.sources import common_data, resolve_source
from resnetlab.studies.common import EvalSets, accuracy, evaluation_split, study_dir, write_csv, write_report
from resnetlab.studies.figures import consecutive_runs, data_caption, legend_outside, new_figure, save_figure


@contextmanager
def lesioned(model: ResNet, indices: set[int]):
    """Temporarily delete the residual branch of the blocks at ``indices``; every block gets its own state back."""
    blocks = model.blocks()
    saved = [block.lesioned for block in blocks]
    try:
        for i in indices:
            blocks[i].lesioned = True
        yield model
    finally:
        for block, state in zip(blocks, saved):
            block.lesioned = state


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


def deletable_blocks(model: ResNet) -> list[int]:
    return [i for i in range(len(model.blocks())) if can_delete(model, i)]


def random_lesions(model: ResNet, batches: list, ks: list[int], samples: int, seed: int) -> list[dict[str, Any]]:
    """Accuracy with ``k`` deletable blocks deleted at random, ``samples`` draws per k (one for k = 0)."""
    rng = random.Random(seed)
    deletable = deletable_blocks(model)
    too_many = [k for k in ks if k > len(deletable)]
    if too_many:
        raise ConfigError(f"cannot delete {too_many} blocks: {model.name} has {len(deletable)} deletable blocks")
    rows = []
    for k in ks:
        for _ in range(samples if k else 1):
            chosen = set(rng.sample(deletable, k))
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
    saved = [(block.lesioned, block.use_shortcut) for block in blocks]
    was_training = model.training
    model.eval()
    x, y = batch
    rows = []
    try:
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
    finally:  # each block as it was: a plain net stays plain
        for block, (lesioned_state, shortcut) in zip(blocks, saved):
            block.lesioned, block.use_shortcut = lesioned_state, shortcut
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    total = sum(r["paths"] * r["gradient"] for r in rows)
    for r in rows:
        r["path_fraction"] = r["paths"] / 2**n
        r["gradient_share"] = r["paths"] * r["gradient"] / total if total else 0.0
    return rows


def lesion_study(
    source: str,
    *,
    plain: str | None = None,
    pretrained: str | bool | None = None,
    random_init: bool = False,
    data: str | None = None,
    test_subset: int | None = 2000,
    ks: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12),
    samples: int = 5,
    path_samples: int = 3,
    path_images: int = 100,
    out: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Lesion the residual net ``source`` (and the plain net ``plain``): each block alone, k at random; paths.

    Each net is evaluated on the same test images, prepared as it was trained (size, mean, std). Path
    gradients: ``path_samples`` random paths of each length, on the first ``path_images`` test images."""
    resolved = [resolve_source(source, pretrained=pretrained), *([resolve_source(plain)] if plain else [])]
    data = common_data(resolved, data, "study lesion")  # default: the data the nets were trained on
    model = resolved[0].load_resnet(random_init=random_init).eval()
    if not all(block.use_shortcut for block in model.blocks()):
        raise ConfigError(f"{source} ({model.name}) has blocks without a shortcut: pass a residual net as the "
                          "source and the plain net as --plain")  # fmt: skip
    if min(samples, path_samples, path_images) < 1:
        raise ConfigError(f"samples, path samples and path images must be at least 1, got {samples}, "
                          f"{path_samples}, {path_images}")  # fmt: skip
    folder = study_dir("lesion", out)
    eval_sets = EvalSets(data, test_subset=test_subset, seed=seed)
    nets = {"residual": model}
    if plain:
        nets["plain"] = resolved[1].load_resnet().eval()
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for kind, net in nets.items():
        bundle, batches = eval_sets.for_model(net)
        intact = accuracy(net, batches)
        single = single_lesions(net, batches)
        deletable = len(deletable_blocks(net))
        multi = random_lesions(net, batches, [k for k in ks if k <= deletable], samples, seed)
        results[kind] = dict(intact=intact, single=single, multi=multi)
        rows += [dict(net=kind, kind="single", **r) for r in single] + [
            dict(net=kind, kind="random", **r) for r in multi
        ]
        summary[kind] = _net_summary(net, intact, single, multi, deletable)
    summary.update(data=bundle.name, images=sum(len(y) for _, y in batches), folder=str(folder),
                   path_images=min(path_images, len(batches[0][1])), path_samples=path_samples)  # fmt: skip
    x, y = eval_sets.for_model(model)[1][0]
    paths = path_gradient_magnitudes(model, (x[:path_images], y[:path_images]), path_samples, seed)
    write_csv(folder / "lesions.csv", rows, ("net", "kind", "block", "downsampling", "k", "accuracy"))
    write_csv(folder / "paths.csv", paths, ("length", "paths", "gradient", "path_fraction", "gradient_share"))
    split = evaluation_split(bundle)[0]
    chance = summary["residual"]["chance"]
    models = " vs ".join(f"{summary[kind]['model']} ({kind})" for kind in nets)
    caption = data_caption(bundle.name, split, summary["images"])
    title = f"Lesion study: {models}, blocks deleted at test time\n{caption}; (c) on {summary['path_images']} of them"
    save_figure(plot_lesion(results, paths, title, chance=chance, samples=samples), folder / "lesion.png")
    n = len(model.blocks())
    effective = max(paths, key=lambda r: r["gradient_share"])["length"]
    summary["paths"] = dict(blocks=n, most_gradient_at_length=effective,
                            mean_path_length=sum(r["length"] * r["path_fraction"] for r in paths))  # fmt: skip
    write_report(folder, "Lesion study", _report(summary, results, n, effective), summary, figures=["lesion.png"])
    return summary


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _net_summary(net: ResNet, intact: float, single: list[dict[str, Any]], multi: list[dict[str, Any]],
                 deletable: int) -> dict[str, Any]:  # fmt: skip
    """The figures of one net: intact, single lesions split by downsampling or not, mean per random k."""
    measured = [r for r in single if not math.isnan(r["accuracy"])]
    kept = [r["accuracy"] for r in measured if not r["downsampling"]]
    down = [r for r in single if r["downsampling"]]
    return dict(
        model=net.name, intact=intact, chance=100 / net.config.num_classes, blocks=len(single),
        deletable_blocks=deletable,
        mean_single_lesion_nondownsampling=_mean(kept),
        worst_single_lesion_nondownsampling=min(kept, default=None),
        single_lesion_downsampling={str(r["block"]): None if math.isnan(r["accuracy"]) else r["accuracy"]
                                    for r in down},
        mean_single_lesion_downsampling=_mean([r["accuracy"] for r in down if not math.isnan(r["accuracy"])]),
        worst_single_lesion=min((r["accuracy"] for r in measured), default=None),
        random_lesions={str(k): _mean([r["accuracy"] for r in multi if r["k"] == k])
                        for k in sorted({r["k"] for r in multi})},
    )  # fmt: skip


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}%"


def _report(summary: dict[str, Any], results: dict[str, Any], n: int, effective: int) -> list[str]:
    kinds = list(results)
    paragraphs = [f"Data: {summary['data']}, {summary['images']} test images."]
    for kind in kinds:
        s = summary[kind]
        down = ", ".join(f"block {b}: {_pct(a)}" for b, a in s["single_lesion_downsampling"].items()) or "none"
        what = "block" if kind == "residual" else "layer pair (block without shortcut)"
        paragraphs.append(
            f"{kind.capitalize()} net {s['model']}: intact {_pct(s['intact'])} (chance {s['chance']:.1f}%). "
            f"Deleting one non-downsampling {what} leaves {_pct(s['mean_single_lesion_nondownsampling'])} on "
            f"average (worst {_pct(s['worst_single_lesion_nondownsampling'])}). Deleting a downsampling block: "
            f"{down} ('-': cannot be deleted, nothing else carries its input forward)."
        )
    header = "| block | downsampling | " + " | ".join(f"{k}: one deleted" for k in kinds) + " |"
    lines = [header, "|---|---|" + "---|" * len(kinds)]
    for i, row in enumerate(results[kinds[0]]["single"]):
        cells = []
        for kind in kinds:
            single = results[kind]["single"]
            cells.append(_pct(single[i]["accuracy"]) if i < len(single) else "")
        lines.append(f"| {i} | {'yes' if row['downsampling'] else ''} | " + " | ".join(cells) + " |")
    paragraphs.append("\n".join(lines))
    ks = sorted({k for kind in kinds for k in (int(k) for k in summary[kind]["random_lesions"])})
    lines = ["| blocks deleted at random | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(_pct(summary[kind]["random_lesions"].get(str(k))) for kind in kinds)
                     + " |")  # fmt: skip
    paragraphs.append("\n".join(lines))
    paragraphs += [
        f"Paths: {n} blocks give 2^{n} paths, mean length {summary['paths']['mean_path_length']:.1f}; the largest "
        f"share of the input gradient comes from paths of length {effective}.",
    ]
    return paragraphs


def plot_lesion(results: dict[str, Any], paths: list[dict[str, Any]], title: str, *, chance: float,
                samples: int) -> Any:  # fmt: skip
    """(a) single lesions per block (downsampling blocks marked x), (b) k blocks deleted at random: each draw
    a dot, the mean a marker, joined only between consecutive measured k, (c) the share of paths and of the
    gradient by path length. (a) and (b) show the intact accuracy and chance."""
    fig, grid = new_figure(title, 1, 3, size=(17, 5.2))
    axes = grid[0]
    for index, (kind, res) in enumerate(results.items()):
        color = f"C{index}"
        single = res["single"]
        axes[0].plot([r["block"] for r in single], [r["accuracy"] for r in single], "o-", color=color, ms=4,
                     label=f"{kind}: one block deleted")  # fmt: skip
        down = [r for r in single if r["downsampling"]]
        axes[0].plot([r["block"] for r in down], [r["accuracy"] for r in down], "x", color="black", ms=10, mew=2,
                     label="downsampling block" if index == 0 else None)  # fmt: skip
        for ax in axes[:2]:
            ax.axhline(res["intact"], ls=":", color=color, label=f"{kind}: intact ({res['intact']:.1f}%)")
        ks = sorted({r["k"] for r in res["multi"]})
        draws = [(r["k"], r["accuracy"]) for r in res["multi"]]
        axes[1].plot([k for k, _ in draws], [a for _, a in draws], ".", color=color, alpha=0.35, ms=5,
                     label=f"{kind}: one random draw")  # fmt: skip
        means = {k: _mean([a for kk, a in draws if kk == k]) for k in ks}
        axes[1].plot(ks, [means[k] for k in ks], "o", color=color, ms=6, label=f"{kind}: mean of {samples} draws")
        for run in consecutive_runs(ks):  # no line across a k where nothing was measured
            axes[1].plot(run, [means[k] for k in run], "-", color=color)
    for ax in axes[:2]:
        ax.axhline(chance, ls="-.", color="grey", label=f"chance ({chance:.0f}%)")
        ax.set_ylabel("test accuracy (%)")
    axes[0].set_title("(a) one block deleted at a time")
    axes[0].set_xlabel("deleted block (0: next to the input)")
    axes[1].set_title("(b) k blocks deleted at random")
    axes[1].set_xlabel("number of blocks deleted, k (lines join consecutive measured k only)")
    lengths = [r["length"] for r in paths]
    axes[2].bar(lengths, [r["path_fraction"] for r in paths], alpha=0.4, label="share of paths")
    axes[2].plot(lengths, [r["gradient_share"] for r in paths], "o-", color="C3", label="share of gradient")
    axes[2].set_title("(c) paths of the residual net by length")
    axes[2].set_xlabel("path length (residual branches on the path)")
    axes[2].set_ylabel("share (fraction of all paths / of the input gradient)")
    for ax in axes:
        ax.grid(alpha=0.3)
        legend_outside(ax, below=True, fontsize=8, ncol=2)
    return fig
