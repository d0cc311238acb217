"""Accuracy of every inference path of ``resnetlab.backends`` against fp32 PyTorch, on real data.

    RESNETLAB_SHARED=../shared python benchmarks/backend_accuracy.py [--cifar-images 10000] [--photos all] [--json]

1. The published CIFAR-10 ResNet-20 and ResNet-56 (../shared/weights/cifar10-akamaster) on the CIFAR-10
   JPEG test set: top-1 of each path, and its difference from fp32 (issue 17: within 0.3 points).
2. ResNet-50 on the ants/bees photos (../shared/data/hymenoptera.zip): logits cosine (per image, mean and
   worst) and top-1 agreement with fp32 on the val photos (issue 17: cosine >= 0.999, agreement >= 99%).
   No ImageNet weights can be had offline here, so the model is ``ants_bees_resnet50``: a ResNet-50 with
   random (seeded) convolutions whose BatchNorm statistics are re-estimated on the train photos and whose
   head is fitted to them (logistic regression on its pooled features).

The int8 paths are calibrated on training images only (256 CIFAR train images; the ants/bees train photos).
A measurement, not a test: tests/test_backends.py asserts a smaller version of both on every CI run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import warnings
from typing import Any

import torch
from torch import nn

from resnetlab.backends import BACKENDS, agreement, build
from resnetlab.models import ResNet


def logits(forward: Any, images: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([forward(part.contiguous()).float() for part in images.split(batch)])


def compare_paths(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, calibration: torch.Tensor, *,
                  batch: int, names: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Top-1 and agreement with fp32 eager of each installed path on ``images``."""
    reference = logits(build("eager", model), images, batch)
    report: dict[str, Any] = {}
    logits_of: dict[str, torch.Tensor] = {}
    for name in names or list(BACKENDS):
        if BACKENDS[name].missing():
            report[name] = {"skipped": BACKENDS[name].missing()}
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            forward = build(name, model, calibration=calibration)
        out = reference if name == "eager" else logits(forward, images, batch)
        logits_of[name] = out
        top1 = 100 * float((out.argmax(1) == labels).float().mean())
        report[name] = {"name": name, "top1": round(top1, 2),
                        **{k: round(v, 6) for k, v in agreement(out, reference).items()}}  # fmt: skip
    for row in report.values():
        if "top1" in row:
            row["top1_minus_fp32"] = round(row["top1"] - report["eager"]["top1"], 2)
            row["logits_error_median"] = round(float((logits_of[row["name"]] - reference).norm(dim=1).median()), 6)
    # How decided the fp32 logits are: small ones turn their direction for a small error
    top2 = reference.topk(2, dim=1).values
    report["eager"]["logits_norm_median"] = round(float(reference.norm(dim=1).median()), 6)
    report["eager"]["margin_median"] = round(float((top2[:, 0] - top2[:, 1]).median()), 6)
    for row in report.values():
        row.pop("name", None)
    return report


def compare_features(model: ResNet, images: torch.Tensor, calibration: torch.Tensor, *, batch: int,
                     names: list[str]) -> dict[str, Any]:  # fmt: skip
    """Cosine of each path's pooled features (the classifier's input) with fp32's: how exact the network is,
    whatever its head makes of it (a weak head's logits are small differences of large features)."""
    headless = copy.deepcopy(model)
    headless.reset_classifier(0)
    reference = logits(build("eager", headless), images, batch)
    report: dict[str, Any] = {}
    for name in names:
        if name == "eager" or BACKENDS[name].missing():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = logits(build(name, headless, calibration=calibration), images, batch)
        cosine = nn.functional.cosine_similarity(out, reference, dim=1)
        relative = (out - reference).norm(dim=1) / reference.norm(dim=1)
        report[name] = {"features_cosine_mean": round(float(cosine.mean()), 6),
                        "features_cosine_min": round(float(cosine.min()), 6),
                        "features_relative_error_median": round(float(relative.median()), 6)}  # fmt: skip
    return report


def cifar(name: str, count: int, calibration_count: int = 256) -> dict[str, Any]:
    """A published CIFAR ResNet on the first ``count`` JPEG test images (all classes, in dataset order
    interleaved by a seeded shuffle)."""
    from resnetlab.data import build_data
    from resnetlab.export.quantize import calibration_batch
    from resnetlab.models import create_model
    from resnetlab.paths import shared_dir

    os.environ.setdefault("RESNETLAB_WEIGHTS_PATH", str(shared_dir() / "weights" / "cifar10-akamaster"))
    model = create_model(name, pretrained="cifar10_akamaster").eval()
    data = str(shared_dir() / "data" / "cifar10-jpeg.tar.xz")
    c = model.config
    bundle = build_data(data, augment="none", image_size=c.input_size[-1], mean=c.mean, std=c.std)
    picked = torch.randperm(len(bundle.test), generator=torch.Generator().manual_seed(0))[:count].tolist()
    images = torch.stack([bundle.test[i][0] for i in picked])
    labels = torch.tensor([int(bundle.test[i][1]) for i in picked])
    calibration = calibration_batch(model, data, calibration_count)
    return {"model": name, "images": len(picked), **compare_paths(model, images, labels, calibration, batch=256)}


def photos(folder: str, split: str, limit: int | None, transform: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from pathlib import Path

    from resnetlab.data import load_image
    from resnetlab.errors import DataError

    files = sorted(p for p in (Path(folder) / split).rglob("*") if p.is_file())
    files = files if limit is None else files[:: max(1, len(files) // limit)][:limit]
    images, labels = [], []
    for path in files:
        try:
            images.append(transform(load_image(path, "RGB")))
            labels.append(0 if path.parent.name == "ants" else 1)
        except DataError:
            continue  # the set's imageNotFound.gif
    return torch.stack(images), torch.tensor(labels)


def ants_bees_resnet50(train: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> nn.Module:
    """ResNet-50 with seeded random convolutions, BatchNorm statistics estimated on ``train`` and a
    two-class head fitted on its pooled features (see the module doc for why)."""
    from resnetlab.models import create_model

    torch.manual_seed(seed)
    model = create_model("resnet50", num_classes=2, label_names=("ants", "bees"))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches below
    model.train()
    with torch.no_grad():
        for part in train.split(16):
            model(part)
    model.eval()
    with torch.no_grad():
        pooled = model.forward_head(torch.cat([model.forward_features(p) for p in train.split(16)]), pre_logits=True)
    mean, std = pooled.mean(0), pooled.std(0) + 1e-6
    weight = torch.zeros(2, pooled.shape[1], requires_grad=True)
    bias = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(((pooled - mean) / std) @ weight.T + bias, labels)
        loss = loss + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():  # fold the feature standardisation into the head
        model.fc.weight.copy_(weight / std)
        model.fc.bias.copy_(bias - (weight / std) @ mean)
    return model


def ants_bees(limit: int | None, names: list[str] | None = None, source: str | None = None) -> dict[str, Any]:
    """ResNet-50 on the ants/bees val photos: the model ``source`` names (a run or model folder of a ResNet-50
    trained on them), or else the probe model ``ants_bees_resnet50`` fitted here."""
    import tempfile
    import zipfile

    from resnetlab.data import eval_transform
    from resnetlab.models import create_model
    from resnetlab.paths import shared_dir

    c = create_model("resnet50").config
    transform = eval_transform(c.input_size[-1], c.mean, c.std, crop_pct=c.crop_pct)
    with tempfile.TemporaryDirectory(prefix="resnetlab-antsbees-") as folder:
        with zipfile.ZipFile(shared_dir() / "data" / "hymenoptera.zip") as archive:
            archive.extractall(folder)
        root = os.path.join(folder, "hymenoptera_data")
        train, train_labels = photos(root, "train", limit, transform)
        val, val_labels = photos(root, "val", limit, transform)
    if source is None:
        model = ants_bees_resnet50(train, train_labels)
        described = "resnet50 (random convolutions, BN statistics and head fitted on the ants/bees train photos)"
    else:
        from resnetlab.sources import load_resnet

        model, described = load_resnet(source).eval(), f"resnet50 trained on the ants/bees train photos ({source})"
        if tuple(model.config.label_names or ()) != ("ants", "bees"):
            raise SystemExit(f"{source} is not an ants/bees model (labels {model.config.label_names})")
    report = compare_paths(model, val, val_labels, train[:32], batch=16, names=names)
    features = compare_features(model, val, train[:32], batch=16, names=list(report))
    for name, row in features.items():
        report[name].update(row)
    return {"model": described, "train_photos": len(train), "val_photos": len(val), **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cifar-images", type=int, default=10_000)
    parser.add_argument("--photos", default="all", help="'all' or how many photos per split")
    parser.add_argument(
        "--resnet50",
        metavar="SOURCE",
        help="a ResNet-50 trained on ants/bees (run or model folder); default: the probe model",
    )
    parser.add_argument("--only", choices=("cifar10", "ants_bees"), help="measure one part")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    limit = None if args.photos == "all" else int(args.photos)
    report: dict[str, Any] = {"threads": torch.get_num_threads()}
    if args.only in (None, "cifar10"):
        report["cifar10"] = [cifar(n, args.cifar_images) for n in ("resnet20", "resnet56")]
    if args.only in (None, "ants_bees"):
        report["ants_bees"] = ants_bees(limit, source=args.resnet50)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for part in (*report.get("cifar10", []), *([report["ants_bees"]] if "ants_bees" in report else [])):
        print(part["model"])
        for name in BACKENDS:
            row = part[name]
            if "skipped" in row:
                print(f"  {name:<18} skipped: {row['skipped']}")
                continue
            print(f"  {name:<18} top-1 {row['top1']:6.2f}% ({row['top1_minus_fp32']:+.2f})  cosine mean "
                  f"{row['cosine_mean']:.6f} min {row['cosine_min']:.6f}  top-1 agreement "
                  f"{100 * row['top1_agreement']:.2f}%"
                  + (f"  features cosine {row['features_cosine_mean']:.6f}" if "features_cosine_mean" in row
                     else ""))  # fmt: skip


if __name__ == "__main__":
    main()
