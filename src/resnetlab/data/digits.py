"""The default dataset: scikit-learn's bundled handwritten digits (1,797 8x8 grayscale images, 10 classes).

It ships inside scikit-learn, so the main job runs anywhere without a download. The test split is fixed
(20%, stratified, seed 0) so test accuracies are comparable across runs; images are upscaled once
(bilinear) to ``image_size`` (default 16: a CIFAR ResNet then ends on a 4x4 map) and stored as uint8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resnetlab.data.datasets import TensorImageDataset, stratified_split

DIGITS_CLASSES = [str(d) for d in range(10)]
DIGITS_IMAGE_SIZE = 16
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def load_digits(image_size: int = DIGITS_IMAGE_SIZE) -> dict[str, TensorImageDataset]:
    """``{"train": 1437 images, "test": 360 images}``, uint8 ``(N, 1, image_size, image_size)``."""
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    images = torch.from_numpy(raw.images).float().unsqueeze(1) * (255.0 / 16.0)  # pixel values are 0..16
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8)
    targets = raw.target.tolist()
    train_idx, test_idx = stratified_split(targets, DIGITS_TEST_FRACTION, seed=DIGITS_SPLIT_SEED)
    full = TensorImageDataset(images, targets, DIGITS_CLASSES)
    return {"train": full.subset(train_idx), "test": full.subset(test_idx)}
