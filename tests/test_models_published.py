"""The published CIFAR-10 weights reach, with our option-A nets, what their own implementation reaches."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import resnetlab

# ../shared/README.md: top-1 of the original implementation on the JPEG test set (Pillow decode).
PUBLISHED_JPEG_ACCURACY = {20: 81.03, 32: 82.56, 44: 82.67, 56: 83.20}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="module")
def cifar10_jpeg_test(request) -> tuple[torch.Tensor, torch.Tensor]:
    path = request.getfixturevalue("shared_file")("data/cifar10-jpeg.tar.xz")
    images, labels = [], []
    with tarfile.open(path) as archive:
        for member in archive:
            parts = member.name.split("/")
            if member.isfile() and len(parts) >= 3 and parts[-3] == "test":
                data = archive.extractfile(member).read()
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                labels.append(CLASSES.index(parts[-2]))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return x, torch.tensor(labels)


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
