"""The one image loader used by datasets, prediction and serving: safe, EXIF-aware, mode-normalising.

Untrusted files are opened header-first: the declared size is checked against a pixel limit and an
aspect-ratio limit *before* any pixel buffer is allocated (a 1-KB PNG can declare 1 x 20,000,000 pixels,
which resizing for a model would blow up to gigabytes), and every decoding failure becomes a
:class:`DataError` naming the file. Only regular files are opened: a FIFO or a device named like an image
is refused at once instead of blocking the reader forever.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from resnetlab.errors import DataError
from resnetlab.io import NotRegularFileError, open_regular, printable_name

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

#: Largest image (width x height) decoded by default: Pillow's own warning threshold, ~0.25 GiB as RGB.
MAX_IMAGE_PIXELS = 89_478_485
#: Largest ratio of the long side to the short side. Resizing the short side to a model's input size
#: multiplies the long side by the same factor: a 1 x 1,000,000 strip would become 256 x 256,000,000.
MAX_ASPECT_RATIO = 100


class ImageBoundsError(DataError):
    """An image whose shape (aspect ratio, or size once resized) is outside the limits: refused before
    anything big is allocated. A client error (HTTP 400), unlike a decompression bomb (413)."""


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


def _open_file(path: str | os.PathLike, label: str) -> BinaryIO:
    """A regular file opened for reading; DataError saying what the path is otherwise."""
    try:
        return open_regular(path)
    except FileNotFoundError:
        raise DataError(f"image file not found: {label}") from None
    except NotRegularFileError as err:
        raise DataError(f"not an image file: {err}") from None
    except OSError as err:
        raise DataError(f"cannot read image {label}: {err.strerror or err}") from None


@contextlib.contextmanager
def _open(source: ImageSource, label: str, max_pixels: int | None,
          max_aspect: float | None) -> Iterator[Image.Image]:  # fmt: skip
    """Open lazily (header only) and refuse absurd sizes and shapes before any pixels are allocated."""
    with contextlib.ExitStack() as stack:
        if isinstance(source, bytes | bytearray | memoryview):
            source = io.BytesIO(bytes(source))
        elif isinstance(source, str | os.PathLike):
            source = stack.enter_context(_open_file(source, label))
        try:
            image = stack.enter_context(Image.open(source))
        except Image.DecompressionBombError as err:
            raise DataError(f"refusing image {label}: {err}") from err
        except _DECODE_ERRORS as err:
            raise DataError(f"not a readable image: {label} ({type(err).__name__}: {err})") from err
        width, height = image.size
        if width <= 0 or height <= 0 or (max_pixels is not None and width * height > max_pixels):
            raise DataError(
                f"refusing image {label}: declared size {width}x{height} is empty or exceeds the limit of "
                f"{max_pixels} pixels (possible decompression bomb; pass max_pixels= to raise the limit)"
            )
        if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
            raise ImageBoundsError(
                f"image {label} is {width}x{height} pixels: its long side is more than {max_aspect:g} times its "
                "short side, too thin to resize for a model (crop it into parts)"
            )
        yield image


def probe_image(source: ImageSource, *, name: str | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS,
                max_aspect: float | None = MAX_ASPECT_RATIO) -> tuple[int, int]:  # fmt: skip
    """(width, height) from the header alone; raises DataError for non-images, bombs and absurd shapes."""
    with _open(source, name or describe_source(source), max_pixels, max_aspect) as image:
        return image.size


def load_image(
    source: ImageSource,
    mode: str | None = "RGB",
    *,
    name: str | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    max_aspect: float | None = MAX_ASPECT_RATIO,
    exif_transpose: bool = True,
) -> Image.Image:
    """Decode ``source`` (path, bytes or binary file) into a detached PIL image in ``mode``.

    - EXIF orientation is applied, so photos come out the way viewers show them.
    - Transparent images (RGBA, LA, P with transparency) are flattened onto white, as a viewer shows them.
    - 16/32-bit grayscale (I;16, I, F) is rescaled to 8 bits rather than clipped.
    - ``mode=None`` keeps the decoded mode.
    """
    label = name or describe_source(source)
    with _open(source, label, max_pixels, max_aspect) as image:
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


#: Extensions of the files ``collect_images`` picks from folders.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders searched recursively (regular files with
    an image extension, sorted). Names that are not valid UTF-8 are kept (Python holds their bytes as
    surrogates): show them with ``resnetlab.io.printable_name``, which writes those bytes as ``\\xNN``."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif item.exists() or item.is_symlink():
            files.append(item)
        else:
            raise DataError(f"no such file or folder: {printable_name(item)}")
    return files
