"""Export a model to ONNX, TorchScript or a torch.export program, with a verified metadata sidecar.

Every artifact ``model.onnx`` gets ``model.onnx.json``: architecture, the model config (so predict and
serve apply the right preprocessing), format, options, and the artifact's sha256, which is checked
before an artifact is loaded; a truncated or altered file is refused by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from resnetlab.errors import ConfigError, WeightsError
from resnetlab.filetypes import CONTENTS, PROGRAMS, check_content
from resnetlab.io import remove_leftovers, replace_with, sha256_file, write_temporary
from resnetlab.models import ResNet, ResNetConfig

Forward = Callable[[torch.Tensor], torch.Tensor]


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of every file of a folder artifact (.mlpackage) with its relative names."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode() + b"\0" + sha256_file(item).encode())
    return digest.hexdigest()


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def export_model(
    model: ResNet,
    path: str | os.PathLike,
    fmt: str = "onnx",
    *,
    fold_bn: bool = False,
    quantize: str | None = None,
    calibration: torch.Tensor | None = None,
    opset: int | None = None,
    image_size: int | None = None,
) -> Path:
    """Write ``model`` as ``fmt`` (see ``FORMATS``) to ``path`` plus its sidecar.

    ``fold_bn`` folds BatchNorm into convs first; ``quantize="int8"`` (ONNX only) applies static int8
    quantization calibrated on ``calibration`` (a batch of preprocessed images). The mobile converters'
    own checks (Core ML: spec shapes and operation count; TFLite: LiteRT against PyTorch) are kept in
    the sidecar under ``validated``.
    """
    kind = EXPORT_FORMATS.get(fmt)
    if kind is None:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {sorted(EXPORT_FORMATS)}")
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize must be 'int8', not {quantize!r}")
    if kind.folds_bn_itself and fold_bn:
        raise ConfigError(f"the {fmt} converter folds BatchNorm itself; drop --fold-bn")
    if quantize and not kind.quantizable:
        raise ConfigError("int8 quantization is done with ONNX Runtime: use --format onnx")
    if quantize and calibration is None:
        raise ConfigError("int8 quantization needs calibration images (--calibration-data)")
    path = Path(path)
    if kind.folder and path.suffix != kind.suffix:  # coremltools insists on the suffix
        path = path.with_suffix(kind.suffix)
    if path.is_dir() and not kind.folder:
        raise ConfigError(f"{path} is a folder; name the file to write, e.g. {path / ('model' + kind.suffix)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    folded = 0
    net = model.eval()
    if fold_bn:
        from resnetlab.export.fold import fold_batchnorm

        net, folded = fold_batchnorm(model)
    c = model.config
    example = torch.zeros(2, c.in_chans, *((image_size, image_size) if image_size else c.input_size[1:]))
    # Written beside the target under a hidden name, then renamed into place with its sidecar: a failed or
    # killed export leaves the previous artifact as it was. (A Core ML package is a folder, which cannot
    # be renamed over an existing one: it is written in place.)
    work = path if kind.folder else path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    for leftover in path.parent.glob(f".{path.stem}.tmp-*"):  # of an export that was killed
        leftover.unlink(missing_ok=True)
    remove_leftovers(path.parent, [sidecar(path).name])
    meta_tmp: Path | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            validated = kind.write(net, example, work, opset=opset, quantize=quantize, calibration=calibration)
        meta = {
            "resnetlab_export": 1, "format": fmt, "architecture": model.name, "config": c.to_dict(),
            "fold_bn": fold_bn, "folded_pairs": folded, "quantize": quantize, "torch": torch.__version__,
            "input_name": "input", "sha256": sha256_path(work),
        }  # fmt: skip
        if validated:  # what the converter's own check established (Core ML: spec; TFLite: LiteRT vs PyTorch)
            meta["validated"] = validated
        meta_tmp = write_temporary(sidecar(path), json.dumps(meta, indent=2).encode())
        if work != path:
            replace_with(work, path)
        replace_with(meta_tmp, sidecar(path))
    finally:
        for tmp in (work, meta_tmp):
            if tmp is not None and tmp != path:
                tmp.unlink(missing_ok=True)
    return path


def _write_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, *, opset: int | None,
                quantize: str | None, calibration: torch.Tensor | None) -> dict[str, Any]:  # fmt: skip
    target = path.with_name(path.stem + ".fp32.onnx") if quantize else path
    try:
        onnx_export(net, example, target, opset=opset)
        if quantize:
            from resnetlab.export.quantize import quantize_onnx_int8

            quantize_onnx_int8(target, path, calibration)  # type: ignore[arg-type]
    finally:
        if quantize:
            target.unlink(missing_ok=True)
    config = getattr(net, "config", None)
    if isinstance(config, ResNetConfig):
        stamp_onnx_metadata(path, getattr(net, "name", "resnet"), config)
    return {}


def onnx_metadata(architecture: str, config: ResNetConfig) -> dict[str, str]:
    """What a runtime needs to use an ONNX file without its sidecar, as ``metadata_props`` strings: class
    names, preprocessing (input size, resize ratio, interpolation, mean, std on RGB in [0, 1]), and the
    whole resnetlab config as JSON."""
    c = config
    labels = list(c.label_names) if c.label_names else [str(i) for i in range(c.num_classes)]
    return {
        "architecture": architecture, "labels": json.dumps(labels), "input_size": json.dumps(list(c.input_size)),
        "crop_pct": json.dumps(c.crop_pct), "interpolation": c.interpolation, "mean": json.dumps(list(c.mean)),
        "std": json.dumps(list(c.std)), "input_layout": "NCHW, RGB scaled to [0, 1], then (x - mean) / std",
        "resnetlab_config": json.dumps(c.to_dict()),
    }  # fmt: skip


def stamp_onnx_metadata(path: Path, architecture: str, config: ResNetConfig) -> None:
    """Write ``onnx_metadata`` into the ONNX file's ``metadata_props`` (replacing keys of the same name)."""
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props} | onnx_metadata(architecture, config)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _write_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path, **_: Any) -> dict[str, Any]:
    torch.jit.save(torch.jit.trace(net, example), str(path))
    return {}


def _write_exported_program(net: torch.nn.Module, example: torch.Tensor, path: Path, **_: Any) -> dict[str, Any]:
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: batch},)), str(path))
    return {}


def _write_mobile(converter: str) -> Callable[..., dict[str, Any]]:
    """A writer calling ``resnetlab.export.mobile.<converter>``; returns its validation facts."""

    def write(net: torch.nn.Module, example: torch.Tensor, path: Path, **_: Any) -> dict[str, Any]:
        from resnetlab.export import mobile

        facts = getattr(mobile, converter)(net, path)
        return {k: v for k, v in facts.items() if k != "path"}

    return write


@dataclass(frozen=True)
class ExportFormat:
    """One export format: its file suffix, its writer ``(net, example, path, *, opset, quantize,
    calibration) -> validation facts``, and what it supports."""

    title: str
    suffix: str
    write: Callable[..., dict[str, Any]]
    quantizable: bool = False  # int8 with ONNX Runtime
    folds_bn_itself: bool = False  # the converter folds BatchNorm: --fold-bn is refused
    folder: bool = False  # the artifact is a folder (written in place, not renamed)
    not_here: str | None = None  # why it cannot be run (and compared with PyTorch) here, if it cannot


#: Every export format, by its ``--format`` name: the one place to add one.
EXPORT_FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat("ONNX", ".onnx", _write_onnx, quantizable=True),
    "torchscript": ExportFormat("TorchScript", ".pt", _write_torchscript),
    "exported-program": ExportFormat("torch.export", ".pt2", _write_exported_program),
    "tflite": ExportFormat("TFLite", ".tflite", _write_mobile("to_tflite"), folds_bn_itself=True),
    "coreml": ExportFormat("Core ML", ".mlpackage", _write_mobile("to_coreml"), folds_bn_itself=True, folder=True,
                           not_here="Core ML needs macOS"),
}  # fmt: skip
#: ``--format`` name -> file suffix.
FORMATS = {name: kind.suffix for name, kind in EXPORT_FORMATS.items()}


def onnx_export(net: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike, *,
                opset: int | None = None) -> None:  # fmt: skip
    """Write ``net`` (any image classifier, e.g. torchvision's) as one self-contained ONNX file with a
    dynamic batch axis; input ``input``, output ``logits``."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), opset_version=opset, external_data=False,
                          verbose=False)  # fmt: skip


ORT_OPTIMIZATION = ("disable", "basic", "extended", "layout", "all")


def onnx_session(path: str | os.PathLike, *, threads: int | None = None, optimization: str = "all",
                 device: str = "cpu", spin: bool = True, arena: bool = True) -> Forward:  # fmt: skip
    """An ONNX Runtime session for ``path`` as a forward function (float tensor -> logits tensor).

    ``optimization`` is ONNX Runtime's graph optimisation level (``all`` is its default). ``device="cuda"``
    needs the onnxruntime-gpu package; inputs are then copied to the host and back, and that is timed too.
    ``spin=False`` stops idle worker threads from busy-waiting after a run (they would steal the CPU from
    whatever runs next, e.g. another model in a benchmark); ``arena=False`` returns working memory to the
    system after each run instead of keeping it in ONNX Runtime's arena (to measure it).
    """
    import onnxruntime as ort

    if optimization not in ORT_OPTIMIZATION:
        raise ConfigError(f"unknown ONNX Runtime optimisation level {optimization!r}; choose one of {ORT_OPTIMIZATION}")
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError("ONNX Runtime here has no CUDA provider (install onnxruntime-gpu), or use --device cpu")
        providers = ["CUDAExecutionProvider"]
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    level = "ORT_DISABLE_ALL" if optimization == "disable" else f"ORT_ENABLE_{optimization.upper()}"
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.enable_cpu_mem_arena = arena
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=providers)
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        logits = session.run(None, {name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)

    return forward


def read_export(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of an exported artifact, after checking the artifact against its sha256."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"exported model not found: {path}")
    try:
        meta = json.loads(sidecar(path).read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path} has no metadata file {sidecar(path).name}; re-export it with resnetlab") from None
    except json.JSONDecodeError as err:
        raise WeightsError(f"{sidecar(path)} is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise WeightsError(f"{sidecar(path)} is not a resnetlab export sidecar (a JSON object)")
    if sha256_path(path) != meta.get("sha256"):
        raise WeightsError(f"{path} is corrupt or was modified: its sha256 differs from {sidecar(path).name}")
    return meta


def load_export(path: str | os.PathLike, *, threads: int | None = None,
                allow_program: bool = False) -> tuple[Forward, ResNetConfig, dict[str, Any]]:  # fmt: skip
    """A forward function (float tensor -> logits), the model config and the metadata of an artifact.

    The loader is chosen from the artifact's content (``filetypes.check_content``), which must agree with
    its extension and with the sidecar's ``format``: a file named ``.onnx`` is only ever opened by ONNX
    Runtime. TorchScript and torch.export artifacts are programs (loading one runs code it carries): they
    load only with ``allow_program=True``.
    """
    meta = read_export(path)
    fmt = meta.get("format")
    if fmt not in FORMATS:
        raise WeightsError(f"{sidecar(Path(path)).name} names an unknown format {fmt!r}")
    check_content(path, (fmt,))
    if fmt in PROGRAMS and not allow_program:
        raise WeightsError(f"{path} is {CONTENTS[fmt]}: loading it runs code it contains. Load it only if you "
                           "trust its origin, with --allow-program (allow_program=True in Python); the ONNX "
                           "export runs without that")  # fmt: skip
    try:
        config = ResNetConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"{sidecar(Path(path)).name} holds no usable model config ({err})") from err
    if fmt == "coreml":
        raise ConfigError("Core ML models run on Apple platforms only; use the ONNX or TFLite export here")
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_path=str(path), num_threads=threads).get_signature_runner()
        ((input_name, details),) = runner.get_input_details().items()
        fixed = int(details["shape"][0])  # a TFLite artifact has a fixed batch (1 as exported here)

        def forward_tflite(x: torch.Tensor) -> torch.Tensor:
            """Any batch: run it in slices of the artifact's fixed batch, the last one padded."""
            outputs = []
            for part in x.float().cpu().split(fixed):
                padded = torch.cat([part, part.new_zeros(fixed - len(part), *part.shape[1:])])
                (output,) = runner(**{input_name: padded.contiguous().numpy()}).values()
                outputs.append(torch.from_numpy(output)[: len(part)])
            return torch.cat(outputs)

        return forward_tflite, config, meta
    if fmt == "onnx":
        return onnx_session(path, threads=threads), config, meta
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu").eval()
    else:
        module = torch.export.load(str(path)).module()

    def forward_torch(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return forward_torch, config, meta


def max_difference(model: ResNet, path: str | os.PathLike, batch: torch.Tensor) -> float:
    """Largest absolute difference between the artifact's and the PyTorch model's logits on ``batch``
    (``path``: an artifact just written by ``export_model``, so its programs are loaded)."""
    forward, _, _ = load_export(path, allow_program=True)
    with torch.no_grad():
        return float((forward(batch) - model.eval()(batch)).abs().max())


class ExportedModel(torch.nn.Module):
    """An exported artifact behind the ``ResNet`` interface that ``Predictor`` uses (``config``, ``name``)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, *, allow_program: bool = False) -> None:
        super().__init__()
        self.run, self.config, self.meta = load_export(path, threads=threads, allow_program=allow_program)
        self.name = f"{self.meta['architecture']} ({self.meta['format']}{', int8' if self.meta['quantize'] else ''})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x.float())


def is_export(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and sidecar(Path(path)).is_file()
