"""Tiny ImageFolder datasets that a network learns in a few steps: reddish against bluish squares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_colour_folder(root: Path, counts: dict[str, int], *, noise: int, boost: int, size: int = 16) -> Path:
    """``root/{split}/{red,blue}/{i}.png`` for each split in ``counts``: uniform noise in [0, noise), plus
    ``boost`` in the red or the blue channel. Seeded, so the same call writes the same images."""
    rng = np.random.default_rng(0)
    for split, count in counts.items():
        for label, channel in (("red", 0), ("blue", 2)):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, noise, (size, size, 3), dtype=np.uint8)
                pixels[..., channel] += boost
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root
