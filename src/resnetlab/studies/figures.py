"""What every study figure shares, so that each one stands on its own.

- a title naming the models, the data and the split (``data_caption``);
- one colour per depth, the same for a plain net and its residual twin, and one line style per family
  (plain dashed, residual solid): ``line_style``;
- legends outside the axes, where they cover no data (``legend_outside``, ``figure_legend``).

Plotting functions build and return a ``Figure`` (tests inspect it); ``save_figure`` writes and closes it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from resnetlab.studies.common import pyplot

#: Dark, distinct colours that read well as thin dashed lines on white (no yellow, no light grey).
DEPTH_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
#: Line style and legend word of each family of twins.
FAMILY_STYLE = {"plain": {"ls": "--", "word": "plain"}, "resnet": {"ls": "-", "word": "residual"}}
_TWIN_NAME = re.compile(r"^(plain|resnet)(\d+)\b")


def data_caption(data: str, split: str, images: int) -> str:
    """E.g. "cifar10-jpeg, test split (1,000 images)": which data a figure measured, and how much of it."""
    return f"{data}, {split} split ({images:,} images)"


def depth_colours(depths: Iterable[int]) -> dict[int, str]:
    """A colour per depth, in increasing order of depth (the same in every figure of a study)."""
    ordered = sorted(set(depths))
    return {d: DEPTH_COLOURS[i % len(DEPTH_COLOURS)] for i, d in enumerate(ordered)}


def twin(name: str) -> tuple[str, int] | None:
    """("plain", 56) for "plain56" or "plain56/none", None for a name outside the plain/resnet family."""
    match = _TWIN_NAME.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def line_style(name: str, colours: dict[int, str], index: int) -> dict[str, Any]:
    """Colour by depth and style by family for plain/resnet twins; the default colour cycle otherwise."""
    parsed = twin(name)
    if parsed is None or parsed[1] not in colours:
        return {"color": f"C{index % 10}", "ls": "-"}
    family, depth = parsed
    return {"color": colours[depth], "ls": FAMILY_STYLE[family]["ls"]}


def new_figure(title: str, rows: int = 1, cols: int = 1, *, size: tuple[float, float], **options: Any):
    """A figure with its title and a ``rows x cols`` grid of axes (always 2-D), laid out so that titles,
    labels and outside legends never overlap. The x axes count things (layers, blocks, steps): integer ticks."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained", **options)
    fig.suptitle(title, fontsize=11)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def legend_outside(ax: Any, *, below: bool = False, **options: Any) -> Any:
    """The axes' legend beside it (or below it), never over its data."""
    if below:
        return ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), borderaxespad=0, **options)
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, **options)


def figure_legend(fig: Any, handles: Sequence[Any], **options: Any) -> Any:
    """One legend for the whole figure, to the right of every panel."""
    return fig.legend(handles=list(handles), loc="outside right upper", **options)


def style_key(**options: Any) -> list[Any]:
    """Legend entries for the two line styles (in black: the colour says the depth)."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], color="black", ls=s["ls"], label=f"{s['word']} net", **options)
            for s in FAMILY_STYLE.values()]  # fmt: skip


def consecutive_runs(values: Sequence[int]) -> list[list[int]]:
    """Split sorted integers into runs of consecutive ones: [0,1,2,4,6,7] -> [[0,1,2],[4],[6,7]]. A line
    joins points only within a run, so no line crosses a value that was not measured."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return runs


def save_figure(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
