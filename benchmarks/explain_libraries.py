"""Our Grad-CAM against the PyPI libraries ``grad-cam`` (pytorch_grad_cam) and ``captum``: speed and agreement.

The libraries are not dependencies of resnetlab; install them somewhere apart to run this, e.g.

    pip install --target /tmp/camlibs --no-deps captum grad-cam ttach opencv-python-headless
    PYTHONPATH=src:/tmp/camlibs python benchmarks/explain_libraries.py --json

Model: a CIFAR ResNet-56 (random weights unless --weights names the published file), 64 random 32x32
inputs, the last stage, the predicted class. Prints one JSON object: seconds per call (median of --repeats)
and the largest difference of each library's maps from ours after the same [0, 1] scaling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

import resnetlab
from resnetlab.explain import grad_cam, grad_cam_plus_plus
from resnetlab.sources import load_model


def _scaled(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = (maps.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
    return (maps - low) / span


def _time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="a weights source for resnet56 (default: random weights)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object (the default output)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = (load_model(args.weights) if args.weights else resnetlab.create_model("resnet56")).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    target = model(x).argmax(1)
    rows: dict[str, dict[str, float | str]] = {}

    seconds, ours = _time(lambda: grad_cam(model, x), args.repeats)
    rows["resnetlab gradcam"] = {"seconds": round(seconds, 4)}
    seconds, ours_pp = _time(lambda: grad_cam_plus_plus(model, x), args.repeats)
    rows["resnetlab gradcam++"] = {"seconds": round(seconds, 4)}

    try:
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        targets = [ClassifierOutputTarget(int(t)) for t in target]
        for name, cls, reference in (("gradcam", GradCAM, ours), ("gradcam++", GradCAMPlusPlus, ours_pp)):
            with cls(model=model, target_layers=[model.layer3]) as cam:
                seconds, maps = _time(
                    lambda cam=cam: torch.from_numpy(np.asarray(cam(x, targets=targets))), args.repeats
                )
            difference = float((_scaled(maps) - reference).abs().max())
            rows[f"grad-cam {name}"] = {"seconds": round(seconds, 4), "max_abs_difference": round(difference, 4)}
    except ImportError as err:
        rows["grad-cam"] = {"error": f"not installed ({err})"}

    try:
        from captum.attr import LayerGradCam

        explainer = LayerGradCam(model, model.layer3)

        def captum_maps() -> torch.Tensor:
            coarse = explainer.attribute(x, target=target, relu_attributions=True).detach()
            return F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]

        seconds, maps = _time(captum_maps, args.repeats)
        difference = float((_scaled(maps) - ours).abs().max())
        rows["captum gradcam"] = {"seconds": round(seconds, 4), "max_abs_difference": round(difference, 4)}
    except ImportError as err:
        rows["captum"] = {"error": f"not installed ({err})"}

    print(json.dumps({"model": "resnet56", "weights": args.weights or "random", "batch": args.batch,
                      "threads": torch.get_num_threads(), "results": rows}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
