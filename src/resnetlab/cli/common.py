"""Small helpers shared by the CLI sub-commands."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Every command that reports figures can print them as one JSON object."""
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


ALLOW_PROGRAM_HELP = "load TorchScript/.pt2 exports: they are programs, which run code they carry"


def add_model_source(parser: argparse.ArgumentParser, *, exports: bool = False) -> None:
    """``--from`` (what to load; see ``resnetlab.sources``), ``--pretrained``, ``--random-init`` and, where
    exports are accepted, ``--allow-program``."""
    what = ("run/model folder, checkpoint" + (", exported artifact" if exports else "")
            + ", weights file, or a model name (with --pretrained TAG or --random-init)")  # fmt: skip
    parser.add_argument("--from", dest="source", required=True, help=what)
    add_weights_options(parser)
    if exports:
        parser.add_argument("--allow-program", action="store_true", help=ALLOW_PROGRAM_HELP)


def add_weights_options(parser: argparse.ArgumentParser) -> None:
    """``--pretrained [TAG]`` and ``--random-init``: the weights of a model name given as ``--from``."""
    parser.add_argument("--pretrained", metavar="TAG",
                        help="weights for a model name: a tag (tv_in1k, cifar10_akamaster), 'default' (the "
                        "name's first published tag, which is then named) or a weights file")  # fmt: skip
    parser.add_argument("--random-init", action="store_true",
                        help="use a model name with untrained (random) weights, on purpose")  # fmt: skip


def source_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``resnetlab.sources.load_model`` that the source options above set."""
    return {"pretrained": args.pretrained, "random_init": args.random_init,
            "allow_program": getattr(args, "allow_program", False)}  # fmt: skip


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
