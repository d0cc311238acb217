"""``resnetlab models [PATTERN]`` and ``resnetlab info NAME``."""

from __future__ import annotations

import argparse
from typing import Any

from resnetlab.cli.common import add_json_flag, format_table, positive_int, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", description=models.__doc__)
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnet*' or '*wrn*'")
    p.add_argument("--pretrained", action="store_true", help="only the models with published weights")
    p.add_argument("--markdown", action="store_true", help="a Markdown table with each source paper (docs/models.md)")
    add_json_flag(p)
    p.set_defaults(func=models)

    p = sub.add_parser("info", description=info.__doc__)
    p.add_argument("name")
    p.add_argument(
        "--image-size", type=positive_int, help="input side for FLOPs and output shapes (default: the model's)"
    )
    add_json_flag(p)
    p.set_defaults(func=info)


def models(args: argparse.Namespace) -> int:
    """A table of every named model: parameters, GMACs (billions of multiply-adds, the figure torchvision and
    timm call GFLOPS) at its default input size, block, shortcut and weight tags."""
    from resnetlab.catalog import model_catalog  # precomputed: no torch to import, no network to build

    # --markdown: in the table's order, family by family, the plain twins last
    infos = model_catalog(args.pattern, pretrained=args.pretrained, table_order=args.markdown)
    if args.json:
        print_json({"models": infos})
        return 0
    if args.markdown:
        print(markdown_table(infos))
        return 0
    rows = []
    for i in infos:
        rows.append(dict(
            name=i["name"], params=f"{i['params'] / 1e6:.2f}M", gmacs=f"{i['gmacs']:.2f}",
            input=f"{i['input_size'][1]}px", block=i["block"], shortcut=i["shortcut"], depth=i["depth"],
            weights=",".join(i["weights"]) or "-",
        ))  # fmt: skip
    if rows:
        print(format_table(rows, ["name", "params", "gmacs", "input", "depth", "block", "shortcut", "weights"]))
    else:
        print(f"no model{' with published weights' if args.pretrained else ''} matches {args.pattern!r}")
    return 0


def markdown_table(infos: list[dict[str, Any]]) -> str:
    """The models as a Markdown table: parameters, GMACs at the default input size, and the source paper."""
    lines = ["| model | params | GMACs | input | source |", "|---|---:|---:|---:|---|"]
    for i in infos:
        params = f"{i['params'] / 1e6:.2f}M" if i["params"] >= 1e6 else f"{i['params'] / 1e3:.0f}K"
        lines.append(f"| `{i['name']}` | {params} | {i['gmacs']:.3g} | {i['input_size'][1]} | {i['paper']} |")
    return "\n".join(lines)


def info(args: argparse.Namespace) -> int:
    """Per-stage table (blocks, channels, stride, output shape) and the model's facts."""
    from resnetlab.models import model_info

    size = (3, args.image_size, args.image_size) if args.image_size else None
    i = model_info(args.name, input_size=size)
    if args.json:
        print_json(i)
        return 0
    reference = (
        f" (published: {i['reference_params'] / 1e6:.2f}M, {i['params_source']})" if i["reference_params"] else ""
    )
    print(f"{i['name']}: {i['description']}")
    print(f"  source      {i['paper']}")
    print(f"  parameters  {i['params']:,}{reference}")
    print(f"  GMACs       {i['gmacs']:.3f} multiply-adds at {i['input_size'][1]}x{i['input_size'][2]}")
    print(f"  depth       {i['depth']} weighted layers, {i['block']} blocks, shortcut {i['shortcut']}")
    print(f"  input       {i['input_size']}, mean {i['mean']}, std {i['std']}, crop_pct {i['crop_pct']}")
    print(f"  weights     {', '.join(i['weights']) or 'none published'}\n")
    print(format_table(i["stages"], ["name", "blocks", "channels", "stride", "output"]))
    return 0
