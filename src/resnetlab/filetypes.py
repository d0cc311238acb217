"""What a model file holds, decided from its bytes, and whether its name agrees.

A file's extension is a claim; its first bytes (and, for a zip archive, the names of its members) are the
evidence. Loaders are chosen from the content, and a file whose extension claims something else is refused:
a torch.export archive renamed ``model.onnx`` must never reach ``torch.export.load``. Nothing here parses
more than a header or a zip directory: no pickle is read.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from resnetlab.errors import WeightsError

#: What each content kind is, for messages.
CONTENTS: dict[str, str] = {
    "onnx": "an ONNX model (protobuf)",
    "torchscript": "a TorchScript program (zip archive)",
    "exported-program": "a torch.export program (zip archive)",
    "torch": "PyTorch tensors saved with torch.save",
    "checkpoint": "a resnetlab training checkpoint",
    "safetensors": "a safetensors file",
    "tflite": "a TFLite model",
    "coreml": "a Core ML package",
    "unknown": "no model format resnetlab knows",
}
#: Programs: loading one runs code it carries, so it needs an explicit opt-in (``allow_program``).
PROGRAMS = frozenset({"torchscript", "exported-program"})
#: The content kinds each extension may hold.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    ".onnx": ("onnx",), ".pt": ("checkpoint", "torch", "torchscript"), ".pt2": ("exported-program",),
    ".pth": ("checkpoint", "torch"), ".th": ("torch",), ".bin": ("torch",), ".ckpt": ("checkpoint", "torch"),
    ".safetensors": ("safetensors",), ".tflite": ("tflite",), ".mlpackage": ("coreml",),
}  # fmt: skip


def sniff(path: str | os.PathLike) -> str:
    """The content kind (a ``CONTENTS`` key) of ``path``, from its first bytes; ``WeightsError`` when it is
    not a regular file (a FIFO would block the reader forever)."""
    path = Path(path)
    if path.is_dir():
        return "coreml" if (path / "Manifest.json").is_file() else "unknown"
    if not path.is_file():
        what = "not found" if not path.exists() else "not a regular file"
        raise WeightsError(f"{path}: {what}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return _zip_content(path)
    if head[:1] == b"\x80":  # a pickle (protocol 2+): torch.save's legacy format, read with weights_only
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 100 * 2**20:
        return "safetensors"  # a little-endian header length, then the JSON header
    if head[4:8] == b"TFL3":
        return "tflite"
    if head[:1] == b"\x08":  # protobuf field 1 (ModelProto.ir_version) as a varint: how ONNX files begin
        return "onnx"
    return "unknown"


def _zip_content(path: Path) -> str:
    """torch.save, TorchScript and torch.export all write zip archives; their member names tell them apart."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {n.split("/", 1)[1]: n for n in archive.namelist() if "/" in n}
            if "archive_format" in members:
                return "exported-program"
            if "constants.pkl" in members or any(n.startswith("code/") for n in members):
                return "torchscript"
            if "data.pkl" not in members:
                return "unknown"
            # a resnetlab checkpoint is {"payload": ..., "sha256": ...}: seen in the pickle's bytes, not run
            info = archive.getinfo(members["data.pkl"])
            head = archive.read(info) if info.file_size < 4096 else b""
    except (zipfile.BadZipFile, OSError, KeyError):
        return "unknown"
    return "checkpoint" if b"payload" in head and b"sha256" in head else "torch"


def check_content(path: str | os.PathLike, expected: tuple[str, ...] | None = None) -> str:
    """The content kind of ``path`` after checking that its extension (when it is one of ``EXTENSIONS``)
    and ``expected`` (if given) agree with it.

    Raises ``WeightsError`` saying what the file claims to be and what it holds."""
    path = Path(path)
    content = sniff(path)
    allowed = EXTENSIONS.get(path.suffix.lower(), tuple(CONTENTS))  # a name of its own: the content decides
    refusal = "; refusing to load it (the file was renamed or altered)"
    if content == "unknown" or content not in allowed:
        claimed = " or ".join(CONTENTS[c] for c in allowed)
        raise WeightsError(f"{path} is named as {claimed} but holds {CONTENTS[content]}{refusal}")
    if expected is not None and content not in expected:
        claimed = " or ".join(CONTENTS[c] for c in expected)
        raise WeightsError(f"{path} holds {CONTENTS[content]}, but its metadata says {claimed}{refusal}")
    return content
