"""load_image: modes, EXIF orientation, and refusal of corrupt files, non-images and decompression bombs."""

from __future__ import annotations

import contextlib
import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fuzzing import fuzz
from resnetlab.data import load_image, probe_image
from resnetlab.errors import DataError


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims ``width x height`` (a decompression-bomb header)."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = bytearray(data[16:29])  # width, height, depth, colour type, ...
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def test_rgb_from_path_bytes_and_file(tmp_path):
    image = Image.new("RGB", (5, 3), (10, 20, 30))
    path = tmp_path / "a.png"
    image.save(path)
    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (5, 3) and out.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),  # fully transparent -> white background
        (Image.new("RGBA", (4, 4), (200, 0, 0, 255)), (200, 0, 0)),
        (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    ],
)
def test_modes_become_rgb(image, expected):
    out = load_image(encode(image, "TIFF" if image.mode == "CMYK" else "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == expected


def test_palette_with_transparency_is_flattened():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    out = load_image(encode(image, "PNG", transparency=1))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    image.info.pop("transparency", None)
    assert load_image(encode(image, "PNG")).getpixel((0, 0)) == (0, 0, 255)


def test_sixteen_bit_is_rescaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert image.mode.startswith("I;16")
    out = load_image(encode(image), "L")
    assert out.mode == "L" and out.getpixel((0, 0)) == 128


def test_mode_none_keeps_and_l_converts():
    data = encode(Image.new("RGBA", (3, 3), (0, 0, 255, 255)))
    assert load_image(data, None).mode == "RGBA"
    assert load_image(data, "L").mode == "L"


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (16, 8), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(encode(image, "PNG", exif=exif))
    assert out.size == (8, 16)
    assert out.getpixel((4, 2)) == (255, 0, 0) and out.getpixel((4, 13)) == (0, 0, 255)
    assert load_image(encode(image, "PNG", exif=exif), exif_transpose=False).size == (16, 8)


def test_gif_first_frame():
    out = load_image(encode(Image.new("P", (6, 6), 0), "GIF"))
    assert out.size == (6, 6) and out.mode == "RGB"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello, I am not an image",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 20,
        encode(Image.new("RGB", (64, 64)), "JPEG")[:200],
    ],
    ids=["empty", "text", "png-garbage", "truncated-jpeg"],
)
def test_corrupt_or_non_image_raises_data_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"broken\.jpg"):
        load_image(path)
    with pytest.raises(DataError, match=r"upload\.png"):
        load_image(content, name="upload.png")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(DataError, match="decompression bomb"):
        load_image(png_with_declared_size(100_000, 100_000))  # 10 gigapixels: refused by Pillow's guard
    big = png_with_declared_size(20_000, 5_000)  # 100 megapixels: above our limit, below Pillow's error
    with pytest.warns(Image.DecompressionBombWarning):
        assert probe_image(big, max_pixels=None) == (20_000, 5_000)  # the header really claims that
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(DataError, match="decompression bomb"):
        load_image(big)
    with pytest.raises(DataError, match="exceeds the limit"):
        load_image(encode(Image.new("RGB", (100, 100))), max_pixels=1000)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
@fuzz(1000)
@given(st.binary(max_size=1024))
def test_fuzz_random_bytes_only_raise_data_error(data):
    with contextlib.suppress(DataError):
        load_image(data)


_SEEDS = [encode(Image.new("RGB", (8, 8), (9, 99, 199)), fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
@fuzz(1000)
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8))
def test_fuzz_corrupted_images_only_raise_data_error(seed, edits):
    data = bytearray(seed)
    for position, value in edits:
        data[position % len(data)] = value
    try:
        out = load_image(bytes(data))
    except DataError:
        return
    assert out.mode == "RGB"
