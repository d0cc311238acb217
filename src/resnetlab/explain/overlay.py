"""Pictures of class-activation maps: a heat map over the photo, with the class and its probability."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from resnetlab.errors import InputError

#: The smallest side of an overlay in pixels: a 32 px CIFAR image is enlarged so the map can be read.
MIN_SIDE = 256
#: How much of the heat map shows through where the map is 1 (it fades to the bare photo where it is 0).
ALPHA = 0.6
COLOUR_MAP = "jet"


def _as_array(cam: np.ndarray | torch.Tensor) -> np.ndarray:
    array = cam.detach().float().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam, dtype=np.float32)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2 or not array.size:
        raise InputError(f"a map must be 2-D (H, W), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError("the map holds NaN or infinite values")
    return np.clip(array, 0.0, 1.0)


def heatmap(cam: np.ndarray | torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """The map (values in [0, 1]) coloured with ``COLOUR_MAP`` as an RGB image of ``size`` (width, height)."""
    from matplotlib import colormaps

    array = _as_array(cam)
    grey = Image.fromarray(np.uint8(np.round(array * 255))).resize(size, Image.Resampling.BILINEAR)
    rgb = colormaps[COLOUR_MAP](np.asarray(grey, dtype=np.float32) / 255)[..., :3]
    return Image.fromarray(np.uint8(np.round(rgb * 255)))


def caption(label: str | None, probability: float | None) -> str:
    """``"cat 0.873"``, ``"cat"``, ``"p=0.873"`` or ``""``."""
    parts = [label] if label else []
    if probability is not None:
        parts.append(f"{probability:.3f}" if label else f"p={probability:.3f}")
    return " ".join(parts)


def overlay(image: Image.Image, cam: np.ndarray | torch.Tensor, *, label: str | None = None,
            probability: float | None = None) -> Image.Image:  # fmt: skip
    """The photo with the map laid over it as a heat map (red: where the map is high), captioned with the class
    name and probability when given. An RGB image at least ``MIN_SIDE`` px on its shorter side.

    The map is stretched to the image: pass the image the model saw (``resnetlab.explain.model_view``), not a
    photo the preprocessing cropped, or the two will not line up."""
    if not isinstance(image, Image.Image):
        raise InputError(f"overlay needs a PIL image, got {type(image).__name__}")
    photo = image.convert("RGB")
    scale = max(1.0, MIN_SIDE / min(photo.size))
    size = (round(photo.width * scale), round(photo.height * scale))
    photo = photo.resize(size, Image.Resampling.BICUBIC) if scale > 1 else photo
    array = _as_array(cam)
    weight = Image.fromarray(np.uint8(np.round(array * 255 * ALPHA))).resize(size, Image.Resampling.BILINEAR)
    blended = Image.composite(heatmap(array, size), photo, weight)
    text = caption(label, probability)
    if not text:
        return blended
    try:
        font = ImageFont.load_default(size=max(12, size[0] // 16))
    except TypeError:  # Pillow < 10.1: one small bitmap font
        font = ImageFont.load_default()
    box = ImageDraw.Draw(blended).textbbox((0, 0), text, font=font)
    band = box[3] - box[1] + 12
    framed = Image.new("RGB", (size[0], size[1] + band), "white")
    framed.paste(blended, (0, 0))
    ImageDraw.Draw(framed).text((6, size[1] + 6 - box[1]), text, fill="black", font=font)
    return framed


def model_view(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[Image.Image]:
    """Normalised inputs (N, C, H, W) back to the pictures the model saw (after its resize and crop), so that
    maps at the input's resolution line up with them."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = ((images.detach().float().cpu() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
