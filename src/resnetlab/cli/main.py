"""The ``resnetlab`` command: a thin shell over the library.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``;
the module list below is the only place that names them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from resnetlab.errors import ResNetLabError

COMMAND_MODULES: tuple[str, ...] = (
    "resnetlab.cli.models",
    "resnetlab.cli.train",
    "resnetlab.cli.study",
    "resnetlab.cli.serve",
    "resnetlab.cli.predict",
    "resnetlab.cli.export",
    "resnetlab.cli.benchmark",
    "resnetlab.cli.data",
    "resnetlab.cli.finetune",
    "resnetlab.cli.features",
    "resnetlab.cli.similar",
    "resnetlab.cli.probe",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnetlab",
        description="The complete, faithful ResNet toolkit: models, training, transfer, export, studies.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ResNetLabError as err:
        if getattr(args, "json", False):
            print(json.dumps({"error": type(err).__name__, "message": str(err)}))
        print(f"resnetlab: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `resnetlab models | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("resnetlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
