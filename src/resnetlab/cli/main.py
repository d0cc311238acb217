"""The ``resnetlab`` command: a thin shell over the library.

Each sub-command lives in a module of this package that exposes ``register(subparsers)``; ``COMMANDS``
below is the only place that names them. Only the module of the command being run is imported, so
``resnetlab --help`` and ``--version`` start without torch. Every error reaches the user as one line
and a non-zero exit status, never as a traceback (``RESNETLAB_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Collection, Sequence
from typing import Any, NoReturn

from resnetlab import __version__
from resnetlab.errors import ResNetLabError

#: command -> (the module that registers it, its line in ``resnetlab --help``).
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("resnetlab.cli.models", "list the named architectures"),
    "info": ("resnetlab.cli.models", "describe one architecture stage by stage"),
    "train": ("resnetlab.cli.train", "train a model (no arguments: a ResNet-20 on the bundled digits)"),
    "eval": ("resnetlab.cli.train", "evaluate a trained model on a dataset"),
    "study": ("resnetlab.cli.study", "studies of why residual networks work"),
    "serve": ("resnetlab.cli.serve", "HTTP inference with dynamic batching (FastAPI + uvicorn)"),
    "predict": ("resnetlab.cli.predict", "classify images with a trained model"),
    "explain": ("resnetlab.cli.explain", "show where a model looks: Grad-CAM and other maps as overlay PNGs"),
    "export": ("resnetlab.cli.export", "export a model (onnx, torchscript, exported-program, tflite, coreml)"),
    "benchmark": ("resnetlab.cli.benchmark", "throughput, latency percentiles and memory vs torchvision"),
    "data": ("resnetlab.cli.data", "load a dataset (decoding it into the cache) and describe its splits"),
    "finetune": ("resnetlab.cli.finetune", "fine-tune a pretrained model on a dataset (new head for its classes)"),
    "features": ("resnetlab.cli.features", "embed images (pooled features) into .npy + .csv or parquet"),
    "similar": ("resnetlab.cli.similar", "find the indexed images most similar to query images"),
    "probe": ("resnetlab.cli.probe", "score embeddings: k-NN, logistic regression, retrieval precision@k"),
}
DEBUG_VARIABLE = "RESNETLAB_DEBUG"
MAX_MESSAGE = 2000  # characters of an error message shown; the rest is cut


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that names the command and where its help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Commands:
    """The sub-parsers action as the command modules see it: each command's help line comes from COMMANDS."""

    def __init__(self, action: argparse._SubParsersAction) -> None:
        self.action = action

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return self.action.add_parser(name, help=COMMANDS[name][1], **kwargs)


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser with the full options of ``commands`` (None: all, which imports every command's module);
    the other commands get their help line only."""
    parser = Parser(
        prog="resnetlab",
        description="The complete, faithful ResNet toolkit: models, training, transfer, export, studies.",
        epilog=f"Run 'resnetlab COMMAND --help' for a command's options. {DEBUG_VARIABLE}=1 shows tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = {COMMANDS[name][0] for name in (COMMANDS if commands is None else commands)}
    registered: set[str] = set()
    for name, (module, text) in COMMANDS.items():
        if module in wanted and module not in registered:
            importlib.import_module(module).register(_Commands(sub))
            registered.add(module)
        elif module not in wanted:
            sub.add_parser(name, help=text, add_help=False)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named on the line: the first argument that is not an option (the top level has no
    options that take a value)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    try:
        command = _command_in(argv)
        parser = build_parser([command] if command else [])
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except SystemExit as done:  # argparse: --help, --version, a usage error
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BrokenPipeError:  # e.g. `resnetlab models | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("resnetlab: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        return _report(err, json_output=bool(getattr(args, "json", False)))


def describe_error(err: BaseException) -> str:
    """One line for the user: our own errors as written, OS errors with the path, anything else as a bug."""
    if isinstance(err, ResNetLabError):
        text = str(err)
    elif isinstance(err, OSError):  # the disk, permissions, a path: the user can act on it
        names = [str(n) for n in (err.filename, err.filename2) if n is not None]
        text = (err.strerror or str(err)) + (f": {' -> '.join(names)}" if names else "")
    elif isinstance(err, MemoryError):
        text = "out of memory; try a smaller --batch-size or --image-size"
    else:
        text = (f"unexpected {type(err).__name__}: {err} (re-run with {DEBUG_VARIABLE}=1 to see the traceback, "
                "and please report it)")  # fmt: skip
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + " ..."


def _report(err: Exception, *, json_output: bool) -> int:
    message = describe_error(err)
    if json_output:
        print(json.dumps({"error": type(err).__name__, "message": message}))
    print(f"resnetlab: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
