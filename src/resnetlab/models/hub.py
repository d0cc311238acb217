"""Published weights: where they are looked for, how they are downloaded and verified, and their labels.

``fetch_weights(source)`` takes a ``registry.WeightsSource``: it looks for the file in the local weights
folders (``weights_search_path``), downloads it otherwise, checks its sha256 prefix, converts its layout to
resnetlab's and returns the preprocessing and class names the weights were trained with.
``published_weights(path)`` recognises a published file given by path, by the same sha256 prefixes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from resnetlab.errors import WeightsError
from resnetlab.models.integrity import check_published, file_sha256
from resnetlab.models.registry import MODELS, WeightsSource
from resnetlab.models.state_dicts import StateDict, convert_state_dict, load_state_dict_file
from resnetlab.paths import cache_dir

#: CIFAR-10's class names in label order (the order of the official ``batches.meta``).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def weights_search_path() -> list[Path]:
    """Folders searched for weight files before downloading: RESNETLAB_WEIGHTS_PATH, the cache, torch hub."""
    dirs = [Path(p) for p in os.environ.get("RESNETLAB_WEIGHTS_PATH", "").split(os.pathsep) if p]
    return [*dirs, cache_dir() / "weights", Path(torch.hub.get_dir()) / "checkpoints"]


def _imagenet_labels() -> tuple[str, ...]:
    """torchvision's ImageNet metadata (the same order timm and Hugging Face use)."""
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


#: Class names of the datasets published weights predict, by the ``labels`` of a ``WeightsSource``.
LABELS: dict[str, Callable[[], tuple[str, ...]]] = {
    "imagenet-1k": _imagenet_labels,
    "cifar-10": lambda: CIFAR10_CLASSES,
}


def dataset_labels(dataset: str) -> tuple[str, ...]:
    """Class names, in label order, of a dataset that published weights predict."""
    if dataset not in LABELS:
        raise WeightsError(f"no class names known for dataset {dataset!r}; known: {sorted(LABELS)}")
    return LABELS[dataset]()


def weights_metadata(source: WeightsSource) -> dict[str, Any]:
    """The preprocessing published weights (a ``registry.WeightsSource``) were trained with, and the class
    names of their head."""
    extra: dict[str, Any] = dict(source.config)
    if source.labels:
        extra.setdefault("label_names", dataset_labels(source.labels))
    return extra


def fetch_weights(source: WeightsSource) -> tuple[StateDict, dict[str, Any]]:
    """State dict (converted) and preprocessing overrides (with class names) for a ``registry.WeightsSource``."""
    extra = weights_metadata(source)
    if source.kind == "torchvision":
        from torchvision.models import get_weight

        tv_weights = get_weight(source.ref)
        extra.setdefault("label_names", tuple(tv_weights.meta["categories"]))
        filename, url = Path(tv_weights.url).name, tv_weights.url
    else:
        filename, url = source.filename, source.ref
    for folder in weights_search_path():
        candidate = folder / local_weights_name(source, filename)
        if candidate.is_file():
            path = candidate
            break
    else:
        path = _download(source, url, filename)
    check_published(path, source)
    return convert_state_dict(load_state_dict_file(path), source.format), extra


def published_weights(path: str | os.PathLike) -> tuple[str, str, WeightsSource] | None:
    """``(model name, weights tag, source)`` of a published weights file, recognised by its sha256 in
    ``MODELS`` (the same hashes that check a download), or None for any other file."""
    prefixes = {w.sha256_prefix: (name, tag, w) for name, entry in MODELS.items()
                for tag, w in entry.weights.items() if w.sha256_prefix}  # fmt: skip
    if not prefixes:
        return None
    digest = file_sha256(path)
    return next((found for prefix, found in prefixes.items() if digest.startswith(prefix)), None)


def local_weights_name(source: WeightsSource, filename: str) -> str:
    """The name a weights file has in a local weights folder. Hub repos all call theirs
    ``model.safetensors``, so those are named after the repo: ``timm--resnet50d.ra2_in1k.safetensors``."""
    if source.kind == "hf_hub":
        return source.ref.replace("/", "--") + Path(filename).suffix
    return filename


def _download(source: WeightsSource, url: str, filename: str) -> Path:
    target = cache_dir() / "weights" / local_weights_name(source, filename)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if source.kind == "hf_hub":
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(source.ref, filename))
        torch.hub.download_url_to_file(url, str(target), progress=True)
        return target
    except Exception as err:
        raise WeightsError(
            f"could not download {filename} from {url if source.kind != 'hf_hub' else source.ref} "
            f"({type(err).__name__}: {err}). Without internet, download it elsewhere and put it in "
            f"{target.parent} as {target.name} (or in a folder listed in RESNETLAB_WEIGHTS_PATH), "
            f"or pass pretrained=PATH"
        ) from err
