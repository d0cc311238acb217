"""The published CIFAR-10 weights reach, with our option-A nets, what their own implementation reaches."""

from __future__ import annotations

import pytest
import torch

import resnetlab
from resnetlab.data import build_data

# ../shared/README.md: top-1 of the original implementation on the JPEG test set (Pillow decode).
PUBLISHED_JPEG_ACCURACY = {20: 81.03, 32: 82.56, 44: 82.67, 56: 83.20}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def cifar10_jpeg_test(shared_file) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 test images as decoded uint8 (Pillow, via the data layer's cache) and their labels."""
    bundle = build_data(shared_file("data/cifar10-jpeg.tar.xz"), augment="none")
    assert tuple(bundle.classes) == CLASSES
    return bundle.test.images, torch.tensor(bundle.test.targets)


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("depth", sorted(PUBLISHED_JPEG_ACCURACY))
def test_published_cifar_weights_accuracy(depth, shared_file, monkeypatch, cifar10_jpeg_test) -> None:
    monkeypatch.setenv("RESNETLAB_WEIGHTS_PATH", str(shared_file("weights/cifar10-akamaster")))
    model = resnetlab.create_model(f"resnet{depth}", pretrained=True).eval()
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std).view(1, 3, 1, 1)
    images, labels = cifar10_jpeg_test
    assert len(labels) == 10_000
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), 1000):
            x = (images[i : i + 1000].float() / 255 - mean) / std
            correct += (model(x).argmax(1) == labels[i : i + 1000]).sum().item()
    accuracy = 100 * correct / len(labels)
    assert abs(accuracy - PUBLISHED_JPEG_ACCURACY[depth]) <= 0.1, accuracy
