"""Do the maps mean something? Two checks, shared by the tests and docs/results/explain_checks.py.

- ``randomisation_check`` (Adebayo et al. 2018, "Sanity checks for saliency maps"): a map that explains the
  model must change when the model's weights are re-initialised. We measure the Spearman rank correlation
  between the maps of a trained net and of the same architecture with fresh weights; an edge detector that
  ignores the model would score near 1.
- ``pointing_game`` (Zhang et al. 2016, on mosaics): four images of different classes tiled 2x2; the map
  for each image's class should peak in that image's quadrant. Chance is 25%.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from resnetlab.explain.cam import cam_maps


def reinitialised(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every weight re-drawn by its own ``init_weights`` and BatchNorm running
    statistics reset: the same architecture knowing nothing (the "full randomisation" of Adebayo et al.)."""
    clone = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clone.init_weights()
        for m in clone.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
    return clone.eval()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two maps (ties get their mean rank); NaN when either map is constant."""
    from scipy.stats import spearmanr

    x, y = a.flatten().cpu().numpy(), b.flatten().cpu().numpy()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


@dataclass
class RandomisationResult:
    """Rank correlations, one per image, between the trained and the re-initialised net's maps.

    A constant map (typically all zero: the random net's weighted channels are negative everywhere, and the
    ReLU of Grad-CAM leaves nothing) has no ranking: its correlation is NaN here, counted in ``constant``
    and as 0 (no shared ranking) in ``median``; ``median_defined`` leaves those images out."""

    method: str
    stage: int | None
    correlations: list[float]

    @property
    def median(self) -> float:
        return float(np.median([c if c == c else 0.0 for c in self.correlations]))

    @property
    def median_defined(self) -> float:
        defined = [c for c in self.correlations if c == c]
        return float(np.median(defined)) if defined else float("nan")

    @property
    def constant(self) -> int:
        return sum(c != c for c in self.correlations)

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "stage": self.stage, "images": len(self.correlations),
                "median_spearman": round(self.median, 4), "median_spearman_defined": round(self.median_defined, 4),
                "constant_maps": self.constant}  # fmt: skip


def randomisation_check(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, method: str = "gradcam",
                        stage: int | None = None, seed: int = 0, **options: object) -> RandomisationResult:  # fmt: skip
    """Maps of ``model`` and of ``reinitialised(model)`` for the true ``labels`` (the same target for both,
    so only the weights differ), compared image by image."""
    trained = cam_maps(model, images, method=method, target=labels, stage=stage, **options)[0][:, 0]
    random = cam_maps(reinitialised(model, seed), images, method=method, target=labels, stage=stage, **options)[0][:, 0]
    return RandomisationResult(method, stage, [spearman(a, b) for a, b in zip(trained, random)])


# ---------------------------------------------------------------------------- the pointing game
def make_mosaics(images: torch.Tensor, labels: torch.Tensor, count: int, *,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``count`` 2x2 mosaics of four images of four different classes, drawn at random from ``images``
    (N, C, h, w), and their classes (count, 4) in quadrant order: top-left, top-right, bottom-left,
    bottom-right."""
    generator = torch.Generator().manual_seed(seed)
    by_class = {int(c): torch.nonzero(labels == c).flatten() for c in labels.unique()}
    classes = torch.tensor(sorted(by_class))
    if len(classes) < 4:
        raise ValueError("mosaics need images of at least four classes")
    tiles, chosen = [], []
    for _ in range(count):
        four = classes[torch.randperm(len(classes), generator=generator)[:4]]
        picks = [by_class[int(c)][torch.randint(len(by_class[int(c)]), (1,), generator=generator)].item() for c in four]
        top, bottom = (
            torch.cat([images[picks[0]], images[picks[1]]], 2),
            torch.cat([images[picks[2]], images[picks[3]]], 2),
        )
        tiles.append(torch.cat([top, bottom], 1))
        chosen.append(four)
    return torch.stack(tiles), torch.stack(chosen)


def quadrant_hits(maps: torch.Tensor) -> torch.Tensor:
    """(M, 4, H, W) maps, map q for the image in quadrant q -> (M, 4) hit scores: the share of the map's
    maximal pixels that lie in quadrant q (1 or 0 for a unique peak; ties split, so a flat map scores 1/4)."""
    height, width = maps.shape[-2:]
    peak = maps >= maps.amax(dim=(2, 3), keepdim=True)
    inside = torch.zeros(4, height, width, dtype=torch.bool)
    h, w = height // 2, width // 2
    for i, (top, left) in enumerate(((0, 0), (0, w), (h, 0), (h, w))):
        inside[i, top : top + h, left : left + w] = True
    return (peak & inside[None]).sum(dim=(2, 3)).float() / peak.sum(dim=(2, 3)).float()


@dataclass
class PointingResult:
    """Pointing-game hit scores of one method and stage: ``hits`` (M, 4); ``ranked`` (M, 4) marks the
    quadrants whose class is among the model's top 4 for the mosaic (the ones the model's logits 'see')."""

    method: str
    stage: int | None
    hits: torch.Tensor
    ranked: torch.Tensor

    @property
    def rate(self) -> float:
        return float(self.hits.mean())

    @property
    def ranked_rate(self) -> float:
        return float(self.hits[self.ranked].mean()) if self.ranked.any() else float("nan")

    def to_dict(self) -> dict[str, object]:
        return {"method": self.method, "stage": self.stage, "mosaics": len(self.hits),
                "hit_rate": round(self.rate, 4), "quadrants": self.hits.numel(),
                "hit_rate_ranked": round(self.ranked_rate, 4), "ranked_quadrants": int(self.ranked.sum())}  # fmt: skip


def pointing_game(model: nn.Module, mosaics: torch.Tensor, classes: torch.Tensor, *, method: str = "gradcam",
                  stage: int | None = None, batch_size: int = 64, **options: object) -> PointingResult:  # fmt: skip
    """For each mosaic, the map of each of its four classes; a hit when it peaks in that class's quadrant."""
    hits, ranked = [], []
    for start in range(0, len(mosaics), batch_size):
        maps, logits = cam_maps(model, mosaics[start : start + batch_size], method=method,
                                target=classes[start : start + batch_size], stage=stage, **options)  # fmt: skip
        hits.append(quadrant_hits(maps.cpu()))
        top4 = logits.topk(4, dim=1).indices.cpu()
        ranked.append((classes[start : start + batch_size, :, None] == top4[:, None, :]).any(2))
    return PointingResult(method, stage, torch.cat(hits), torch.cat(ranked))


def correctly_classified(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         batch_size: int = 500) -> torch.Tensor:  # fmt: skip
    """A boolean mask of the images ``model`` classifies correctly (mosaics are built from these, so that each
    tile holds evidence the model can recognise on its own)."""
    with torch.no_grad():
        was_training = model.training
        model.eval()
        predicted = torch.cat([model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
        model.train(was_training)
    return predicted.cpu() == labels.cpu()


def normalise_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (N, C, H, W), as the data layer decodes them, -> the model's normalised input."""
    x = images.float() / 255
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
