"""The one image loader used by datasets, prediction and serving: safe, EXIF-aware, mode-normalising.

Untrusted files are opened header-first: the declared size is checked against a pixel limit *before*
any pixel buffer is allocated, and every decoding failure becomes a :class:`DataError` naming the file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from resnetlab.errors import DataError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

#: Largest image (width x height) decoded by default: Pillow's own warning threshold, ~0.25 GiB as RGB.
MAX_IMAGE_PIXELS = 89_478_485

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Everything Pillow raises for a file that is not an image, is truncated or is malformed.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, TypeError,
                  IndexError, KeyError, MemoryError, Image.DecompressionBombError)  # fmt: skip


def describe_source(source: ImageSource) -> str:
    """A short name for error messages: the path, or what kind of in-memory object it was."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    return str(getattr(source, "name", "<file object>"))


def _open(source: ImageSource, label: str, max_pixels: int | None) -> Image.Image:
    """Open lazily (header only) and refuse absurd sizes before any pixels are allocated."""
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, str | os.PathLike) and not Path(source).is_file():
        raise DataError(f"image file not found: {label}")
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as err:
        raise DataError(f"refusing image {label}: {err}") from err
    except _DECODE_ERRORS as err:
        raise DataError(f"not a readable image: {label} ({type(err).__name__}: {err})") from err
    width, height = image.size
    if width <= 0 or height <= 0 or (max_pixels is not None and width * height > max_pixels):
        image.close()
        raise DataError(
            f"refusing image {label}: declared size {width}x{height} is empty or exceeds the limit of "
            f"{max_pixels} pixels (possible decompression bomb; pass max_pixels= to raise the limit)"
        )
    return image


def probe_image(source: ImageSource, *, name: str | None = None,
                max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[int, int]:  # fmt: skip
    """(width, height) from the header alone; raises DataError for non-images and bombs."""
    with _open(source, name or describe_source(source), max_pixels) as image:
        return image.size


def load_image(
    source: ImageSource,
    mode: str | None = "RGB",
    *,
    name: str | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    exif_transpose: bool = True,
) -> Image.Image:
    """Decode ``source`` (path, bytes or binary file) into a detached PIL image in ``mode``.

    - EXIF orientation is applied, so photos come out the way viewers show them.
    - Transparent images (RGBA, LA, P with transparency) are flattened onto white, as a viewer shows them.
    - 16/32-bit grayscale (I;16, I, F) is rescaled to 8 bits rather than clipped.
    - ``mode=None`` keeps the decoded mode.
    """
    label = name or describe_source(source)
    with _open(source, label, max_pixels) as image:
        try:
            image.load()
        except _DECODE_ERRORS as err:
            raise DataError(f"cannot decode image {label} ({type(err).__name__}: {err})") from err
        try:
            decoded = ImageOps.exif_transpose(image) if exif_transpose else image.copy()
        except Exception:  # malformed EXIF must not reject an image that decoded fine
            decoded = image.copy()
    return convert_mode(decoded, mode) if mode else decoded


def convert_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode`` handling the cases ``Image.convert`` gets wrong (alpha, palettes, 16-bit)."""
    if image.mode == mode:
        return image
    if image.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in _ALPHA_MODES and mode not in ("RGBA", "LA"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert(mode)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Rescale high-bit-depth grayscale to 8-bit L (``convert`` would clip everything above 255)."""
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max(initial=0.0))
    if image.mode in _SIXTEEN_BIT_MODES or 255 < top <= 65535:
        peak = 65535.0
    elif image.mode == "F" and top <= 1.0:
        peak = 1.0
    else:
        peak = max(top, 255.0)
    return Image.fromarray(np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8))
