"""What the CLI sub-commands share: option types that check their values, the training options (spelled the
same in ``train`` and ``finetune``), the options every inference verb has, and early checks of output paths.

Nothing here imports torch at module level: ``resnetlab --help`` must start fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from resnetlab.errors import ConfigError

# ------------------------------------------------------------------------------------- option types


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None


def _bounded(parse: Any, ok: Any, must: str, doc: str) -> Any:
    """An argparse type: ``parse`` the text, then refuse a value for which ``ok`` is false ("must be ...")."""

    def check(text: str) -> Any:
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {must()}, got {str(value)[:40]}")
        return value

    check.__doc__ = f"argparse type: {doc}"
    return check


def _max_seed() -> int:
    from resnetlab.train.config import MAX_SEED

    return MAX_SEED


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text[:40]}")
    return value


positive_int = _bounded(_integer, lambda v: v >= 1, lambda: "a positive integer", "an integer >= 1 (batch sizes)")
non_negative_int = _bounded(_integer, lambda v: v >= 0, lambda: "0 or more", "an integer >= 0 (workers)")
seed_int = _bounded(_integer, lambda v: 0 <= v <= _max_seed(), lambda: f"in 0..{_max_seed()}", "a random seed")
positive_float = _bounded(_number, lambda v: v > 0, lambda: "a number > 0", "a finite number > 0 (timeouts)")
non_negative_float = _bounded(_number, lambda v: v >= 0, lambda: "0 or more", "a finite number >= 0 (fractions)")
port_number = _bounded(_integer, lambda v: 0 <= v <= 65535, lambda: "a port number in 0..65535", "a TCP port")


def device_name(text: str) -> str:
    """argparse type: a device as ``torch.device`` spells it (auto, cpu, cuda, cuda:N, mps)."""
    from resnetlab.train.config import DEVICE_PATTERN

    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return text


# --------------------------------------------------------------------------- options shared by verbs


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """Every command that reports figures can print them as one JSON object."""
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def add_device(parser: argparse.ArgumentParser, default: str = "cpu") -> None:
    parser.add_argument(
        "--device", type=device_name, default=default, help=f"auto, cpu, cuda, cuda:N (default {default})"
    )


def add_batch_size(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--batch-size", type=positive_int, default=default, help=f"images per batch (default {default})"
    )


def add_num_workers(parser: argparse.ArgumentParser, default: int = 2) -> None:
    text = f"DataLoader workers for images decoded per item (default {default}; 0: none)"
    parser.add_argument("--num-workers", type=non_negative_int, default=default, help=text)


def add_backend(parser: argparse.ArgumentParser) -> None:
    """``--backend``: the inference path of predict and serve (``resnetlab.backends``); default ``best``."""
    from resnetlab.backends import BACKENDS

    parser.add_argument("--backend", default="best", choices=["best", *BACKENDS],
                        help="inference path (default best: the fastest path on this CPU whose logits agree with "
                        "fp32, measured once and cached per model and machine; on a GPU: eager)")  # fmt: skip
    parser.add_argument("--calibration-data", metavar="DATA",
                        help="dataset (e.g. the training data) to calibrate the int8 paths on: with it, best "
                        "tries them too, and they can be named")  # fmt: skip
    parser.add_argument(
        "--calibration-images",
        type=positive_int,
        default=256,
        metavar="N",
        help="images drawn from its train split (default 256)",
    )


def backend_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``Predictor.load`` that ``add_backend``'s options give."""
    return {"backend": args.backend, "calibration_data": args.calibration_data,
            "calibration_images": args.calibration_images}  # fmt: skip


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


# ------------------------------------------------------------------------------- training options

#: CLI flag -> TrainConfig field, for the options users change most; everything else via --set key=value.
#: The values are checked by TrainConfig, so a recipe, --set and a flag fail with the same message.
TRAINING_FLAGS: dict[str, tuple[type, str]] = {
    "model": (str, "architecture name (resnetlab models)"),
    "data": (str, "dataset: a path (folder, archive, cifar-10-batches-py) or cifar10/cifar100; default digits"),
    "pretrained": (str, "initial weights: a tag, file or save_pretrained folder"),
    "epochs": (int, "epochs (ignored when max_iters is set)"),
    "max_iters": (int, "stop after this many optimizer steps"),
    "batch_size": (int, "global batch size"),
    "accum_steps": (
        int,
        "accumulate the gradients of this many micro-batches (of batch_size / accum_steps) per "
        "optimizer step: a large batch on a small GPU",
    ),
    "lr": (float, "peak learning rate"),
    "weight_decay": (float, "weight decay"),
    "image_size": (int, "input side in pixels"),
    "val_split": (float, "hold out this fraction (or count) of train to choose the model on (0: the final model)"),
    "device": (str, "auto, cpu, cuda, cuda:N"),
    "amp": (str, "auto, bf16, fp16 or off"),
    "optimizer_impl": (str, "optimizer kernels: auto (fused where available), fused, foreach or loop"),
    "num_workers": (int, "DataLoader workers for datasets decoded per image"),
    "seed": (int, "random seed"),
    "run_dir": (str, "output folder (default runs/<time>-<model>-<data>)"),
    "grad_clip": (float, "clip the gradient norm (0: off)"),
    "label_smoothing": (float, "label smoothing"),
    "ema_decay": (float, "EMA of the weights (0: off)"),
    "eval_every": (int, "steps between evaluations (default: once per epoch, and at the end)"),
}
#: On/off switches: flag -> (TrainConfig field, the value the flag sets, help).
TRAINING_SWITCHES: dict[str, tuple[str, bool, str]] = {
    "--download": ("download", True, "fetch --data cifar10/cifar100 with torchvision when not cached (needs internet)"),
    "--deterministic": ("deterministic", True, "deterministic algorithms"),
    "--sync-bn": ("sync_bn", True, "SyncBatchNorm under torchrun"),
    "--no-progress": ("progress", False, "no progress bar"),
}


def add_training_options(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """The TrainConfig flags, switches, ``--compile`` and ``--set``, for ``train`` and ``finetune`` alike
    (``skip``: fields the command defines itself, with its own help)."""
    for name, (kind, text) in TRAINING_FLAGS.items():
        if name not in skip:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text)
    for flag, (name, value, text) in TRAINING_SWITCHES.items():
        parser.add_argument(flag, dest=name, action="store_const", const=value, default=None, help=text)
    parser.add_argument(
        "--channels-last", nargs="?", const="true", choices=["auto", "true", "false"],
        help="NHWC memory format (default auto: on where it is faster: CPU, and CUDA with amp)",
    )  # fmt: skip
    parser.add_argument(
        "--compile", nargs="?", const="default", metavar="MODE",
        help="torch.compile the training step; MODE: default, reduce-overhead (CUDA graphs, CUDA only), "
        "max-autotune, max-autotune-no-cudagraphs",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="any other recipe option, e.g. --set milestones=[30,60] --set model_options={shortcut: B} "
        "(YAML values; off, on, no, yes stay words)",
    )  # fmt: skip
    # how the engine runs and reports, not TrainConfig fields: passed to train() (see run_options)
    parser.add_argument(
        "--log-every", type=non_negative_int, default=0, metavar="N",
        help="also log train loss, lr and img/s every N steps between evaluations (metrics.csv, log, TensorBoard)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace the run already in --run-dir (its checkpoints, model and metrics) instead of refusing",
    )  # fmt: skip


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig overrides from the flags given and ``--set``; an option given both ways is an error."""
    from resnetlab.train.config import parse_set_option

    names = [*TRAINING_FLAGS, *(name for name, _, _ in TRAINING_SWITCHES.values()), "channels_last"]
    values = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "compile", None) is not None:
        values.update(compile=True, compile_mode=args.compile)
    for text in args.set:
        key, value = parse_set_option(text)
        if key in values:
            raise ConfigError(f"{key} is given twice (a flag and --set {key}=...); give it once")
        values[key] = value
    if getattr(args, "json", False):
        values.setdefault("progress", False)
    return values


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``resnetlab.train.engine.train`` that ``add_training_options`` sets beside the
    config: ``overwrite`` (refused with ``--resume``, which continues the run instead) and ``log_every``."""
    if getattr(args, "resume", None) and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it; choose one")
    return {"overwrite": args.overwrite, "log_every": args.log_every}


# ----------------------------------------------------------------------------- output paths, early

#: Virtual filesystems: writing a run or a report there fails late or does something else entirely.
VIRTUAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))


def _check_location(path: Path, flag: str) -> Path:
    resolved = path.expanduser().resolve()
    if any(resolved == root or root in resolved.parents for root in VIRTUAL_ROOTS):
        raise ConfigError(f"{flag} {path} is on a virtual filesystem ({resolved.parts[1]}); choose a folder on disk")
    return resolved


def _writable_ancestor(path: Path, flag: str, shown: Path) -> None:
    """The nearest existing folder above ``path`` must be a folder we may create entries in."""
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {shown}: {ancestor} is a file, so no folder can be created there")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {shown}: {ancestor} is not writable; choose another folder")


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Refuse at start-up, not after the work, a folder for outputs that cannot be one: a file, a place on
    /proc, /sys or /dev, a folder we may not write."""
    shown = Path(path)
    resolved = _check_location(shown, flag)
    if resolved.exists() and not resolved.is_dir():
        raise ConfigError(f"{flag} {shown} is a file, not a folder; choose a folder for the outputs")
    _writable_ancestor(resolved, flag, shown)
    return resolved


def check_run_dir(config: Any) -> Path:
    """A training config's output folder (``run_dir``, else ``runs_root``), checked as ``check_output_dir`` does."""
    return check_output_dir(*((config.run_dir, "--run-dir") if config.run_dir else (config.runs_root, "runs_root")))


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Refuse at start-up a file path for outputs that is a folder, is in a missing folder, or cannot be written."""
    shown = Path(path)
    resolved = _check_location(shown, flag)
    if resolved.is_dir():
        raise ConfigError(f"{flag} {shown} is a folder; name a file, e.g. {shown / 'predictions.csv'}")
    if not resolved.parent.is_dir():
        raise ConfigError(f"{flag} {shown}: the folder {shown.parent} does not exist")
    if resolved.exists() and not os.access(resolved, os.W_OK):
        raise ConfigError(f"{flag} {shown} is not writable")
    _writable_ancestor(resolved.parent, flag, shown)
    return resolved


# ------------------------------------------------------------------------------------------ output


def display_path(name: str | os.PathLike) -> str:
    """A file name as printable text: bytes that are not UTF-8 (kept by Python as surrogates) become ``\\xNN``."""
    from resnetlab.io import printable_name  # the one spelling of such names, also in the library's messages

    return printable_name(name)


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
