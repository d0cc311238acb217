"""What a ResNet looks at: class-activation maps (Grad-CAM, Grad-CAM++, Score-CAM, occlusion) and overlays.

``grad_cam(model, images)`` and ``explain(model, images, method=...)`` return maps (N, H, W) in [0, 1] at the
input's resolution; ``overlay(image, cam, label=..., probability=...)`` draws one over its photo.
See docs/explain.md.
"""

from resnetlab.explain.cam import (
    BLACK_BOX_METHODS,
    METHODS,
    cam_maps,
    explain,
    grad_cam,
    grad_cam_plus_plus,
    occlusion,
    resolve_stage,
    score_cam,
    stage_count,
    stage_module,
)
from resnetlab.explain.overlay import heatmap, model_view, overlay

__all__ = [
    "BLACK_BOX_METHODS",
    "METHODS",
    "cam_maps",
    "explain",
    "grad_cam",
    "grad_cam_plus_plus",
    "heatmap",
    "model_view",
    "occlusion",
    "overlay",
    "resolve_stage",
    "score_cam",
    "stage_count",
    "stage_module",
]
