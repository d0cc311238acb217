"""``Predictor``: a trained model plus its own preprocessing, answering top-k for any images.

The preprocessing (input size, resize/crop ratio, interpolation, mean/std) comes from the model's saved
config, never from the user; images go through ``resnetlab.data.load_image``, so every mode (L, RGBA,
CMYK, 16-bit, palette), EXIF orientation, corrupt files and decompression bombs are handled the same way
everywhere (predict, features, serve).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from resnetlab.data import eval_transform, load_image
from resnetlab.data.images import MAX_IMAGE_PIXELS
from resnetlab.errors import ConfigError, DataError
from resnetlab.models import ResNet
from resnetlab.sources import load_model

ImageInput = str | os.PathLike | bytes | Image.Image


@dataclass
class Prediction:
    """Top-k classes of one image: (label, class index, probability), best first."""

    labels: list[str]
    indices: list[int]
    probabilities: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"top": [{"label": lab, "index": i, "probability": round(p, 6)}
                        for lab, i, p in zip(self.labels, self.indices, self.probabilities)]}  # fmt: skip


@dataclass
class Explanation:
    """Top-k of one image, the class explained, its probability and its Grad-CAM map (H, W) in [0, 1]."""

    prediction: Prediction
    target: int
    label: str
    probability: float
    cam: torch.Tensor


class Predictor:
    """Classify images with a trained model. Thread-safe: one forward pass at a time per predictor."""

    def __init__(self, model: ResNet | Any, *, device: str | torch.device = "cpu", channels_last: bool = False) -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        c = model.config
        self.in_chans = c.in_chans
        self.image_size = c.input_size[-1]
        self.transform = eval_transform(self.image_size, c.mean, c.std, crop_pct=c.crop_pct)
        self.labels = list(c.label_names) if c.label_names else [str(i) for i in range(c.num_classes)]
        self.backend_reason = "eager: the PyTorch model as given"
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source: str | os.PathLike, *, pretrained: str | bool | None = None, allow_program: bool = False,
             random_init: bool = False, backend: str = "eager", batch_size: int = 16,
             check_images: Sequence[ImageInput] = (), calibration_data: str | None = None,
             calibration_images: int = 256, **kwargs: Any) -> Predictor:  # fmt: skip
        """From any source ``resnetlab.sources.load_model`` resolves (run or model folder, checkpoint, export,
        weights file, a model name with ``pretrained`` weights); its preprocessing and labels come along.
        ``backend``: see ``use_backend``; ``calibration_data``: a dataset whose train split (a seeded draw of
        ``calibration_images``) calibrates the int8 paths, which ``best`` then tries too."""
        model = load_model(source, pretrained=pretrained, allow_program=allow_program, random_init=random_init)
        predictor = cls(model, **kwargs)
        if backend != "eager":
            from resnetlab.backends import BACKENDS

            calibration = None
            wanted = backend == "best" or (backend in BACKENDS and BACKENDS[backend].calibrated)
            if calibration_data is not None and wanted and isinstance(model, ResNet):  # decoded only to be used
                from resnetlab.export.quantize import calibration_batch

                calibration = calibration_batch(model, calibration_data, calibration_images)
            predictor.use_backend(backend, batch_size=batch_size, check_images=check_images, calibration=calibration)
        return predictor

    def use_backend(self, backend: str, *, batch_size: int = 16, check_images: Sequence[ImageInput] = (),
                    calibration: torch.Tensor | None = None) -> str:  # fmt: skip
        """Run the model on ``backend`` (a name of ``resnetlab.backends.BACKENDS``, or ``best``: the fastest
        verified path here, timed at ``batch_size`` and checked against fp32 on up to 16 of ``check_images``,
        unreadable ones ignored; the int8 paths only with ``calibration`` images). Returns, and keeps in
        ``backend_reason``, which path runs and why."""
        from resnetlab.backends import prepare

        images = [t for t in map(self._decode, list(check_images)[:16]) if isinstance(t, torch.Tensor)]
        check = torch.stack(images) if images else None
        self.model, self.backend_reason = prepare(self.model, backend, device=self.device, batch=batch_size,
                                                  check=check, calibration=calibration)  # fmt: skip
        return self.backend_reason

    @property
    def metadata(self) -> dict[str, Any]:
        c = self.model.config
        return {"architecture": self.model.name, "num_classes": c.num_classes, "labels": self.labels,
                "input_size": list(c.input_size), "mean": list(c.mean), "std": list(c.std),
                "crop_pct": c.crop_pct, "device": str(self.device),
                "backend": getattr(self.model, "backend", "eager"), "backend_reason": self.backend_reason}  # fmt: skip

    def preprocess(self, image: ImageInput, name: str | None = None, *,
                   max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:  # fmt: skip
        """One image -> normalised tensor (C, H, W) as the model was trained to see it (files and bytes
        declaring more than ``max_pixels`` are refused before decoding)."""
        if not isinstance(image, Image.Image):
            image = load_image(image, "L" if self.in_chans == 1 else "RGB", name=name, max_pixels=max_pixels)
        elif image.mode != ("L" if self.in_chans == 1 else "RGB"):
            image = image.convert("L" if self.in_chans == 1 else "RGB")
        return self.transform(image)

    def _on_device(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    @torch.no_grad()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        batch = self._on_device(batch)
        with self._lock:
            return self.model(batch).float().cpu()

    def predict_tensors(self, batch: torch.Tensor, top_k: int = 5) -> list[Prediction]:
        return self._top(self.logits(batch).softmax(dim=1), top_k)

    def _top(self, probabilities: torch.Tensor, top_k: int) -> list[Prediction]:
        k = min(top_k, probabilities.shape[1])
        values, indices = probabilities.topk(k, dim=1)
        return [Prediction([self.labels[i] for i in idx.tolist()], idx.tolist(), val.tolist())
                for val, idx in zip(values, indices)]  # fmt: skip

    def explain(self, batch: torch.Tensor, top_k: int = 5, target: int | None = None) -> list[Explanation]:
        """Top-k of each image and its Grad-CAM map for ``target`` (a class index), by default the image's
        top class. Grad-CAM hooks a stage of the shared model, so it holds the predictor's lock like every
        forward pass: a concurrent pass would be captured by that hook."""
        from resnetlab.explain import grad_cam

        if target is not None and not 0 <= target < len(self.labels):
            raise ConfigError(f"class index {target} does not exist: the model has classes 0..{len(self.labels) - 1}")
        probabilities = self.logits(batch).softmax(dim=1)
        predictions = self._top(probabilities, top_k)
        targets = [p.indices[0] if target is None else target for p in predictions]
        with self._lock:
            cams = grad_cam(self.model, self._on_device(batch), target=torch.tensor(targets)).detach().float().cpu()
        return [Explanation(p, t, self.labels[t], float(probabilities[i, t]), cams[i])
                for i, (p, t) in enumerate(zip(predictions, targets))]  # fmt: skip

    def predict(self, images: Sequence[ImageInput], top_k: int = 5) -> list[Prediction]:
        """Top-k for each image (any path, bytes or PIL image); bad images raise ``DataError``."""
        if not images:
            return []
        return self.predict_tensors(torch.stack([self.preprocess(im) for im in images]), top_k)

    def predict_files(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        batch_size: int = 32,
        top_k: int = 5,
        progress: bool = False,
        workers: int | None = None,
    ) -> tuple[list[tuple[str, Prediction]], list[tuple[str, str]]]:
        """Batched prediction over files; unreadable files are reported in the second list, not raised.

        Images are decoded and preprocessed by ``workers`` threads (default: one per CPU core), the next
        batch while the model runs on the current one (decoding and the runtimes release the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        paths = [str(p) for p in paths]
        batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        done: list[tuple[str, Prediction]] = []
        failed: list[tuple[str, str]] = []
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:

            def submit(batch: list[str]) -> list[Any]:
                return [pool.submit(self._decode, path) for path in batch]

            ahead = submit(batches[0]) if batches else []
            for i in tqdm(range(len(batches)), disable=not progress, desc="predict", unit="batch"):
                current, ahead = ahead, (submit(batches[i + 1]) if i + 1 < len(batches) else [])
                names, tensors = [], []
                for path, future in zip(batches[i], current):
                    tensor = future.result()
                    if isinstance(tensor, str):
                        failed.append((path, tensor))
                    else:
                        tensors.append(tensor)
                        names.append(path)
                if tensors:
                    done += list(zip(names, self.predict_tensors(torch.stack(tensors), top_k)))
        return done, failed

    def _decode(self, image: ImageInput) -> torch.Tensor | str:
        """The preprocessed image, or why it cannot be read."""
        try:
            return self.preprocess(image)
        except DataError as err:
            return str(err)
