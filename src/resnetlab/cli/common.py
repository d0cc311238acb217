"""Small helpers shared by the CLI sub-commands."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Every command that reports figures can print them as one JSON object."""
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def add_model_source(parser: argparse.ArgumentParser, *, exports: bool = False) -> None:
    """``--from`` (what to load; see ``resnetlab.loading.load_model``) and ``--pretrained``."""
    what = "run/model folder, checkpoint" + (", exported artifact" if exports else "") + ", or a model name"
    parser.add_argument("--from", dest="source", required=True, help=what)
    parser.add_argument("--pretrained", help="weights tag when --from is a name (e.g. tv_in1k, cifar10_akamaster)")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__fspath__"):
        return str(value)
    return str(value)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Plain aligned text table (no dependency needed for something this small)."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
