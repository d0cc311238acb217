"""Device-resident batches: the same images and recipe as the per-image pipeline, batched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnetlab.data import TensorImageDataset, eval_transform
from resnetlab.data.device import DeviceBatches
from resnetlab.errors import ConfigError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture
def dataset() -> TensorImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, [i % 5 for i in range(37)], [str(i) for i in range(5)])


def test_without_augmentation_matches_the_eval_transform(dataset) -> None:
    batches = DeviceBatches(dataset, 10, mean=MEAN, std=STD, augment=False)
    images, labels = zip(*batches)
    assert [len(x) for x in images] == [10, 10, 10, 7]
    transform = eval_transform(8, MEAN, STD, crop_pct=1.0, source_size=8)
    expected = torch.stack([transform(dataset.images[i]) for i in range(37)])
    assert torch.allclose(torch.cat(images), expected, atol=1e-6)
    assert torch.cat(labels).tolist() == dataset.targets


def test_augmented_batches_are_crops_of_padded_or_flipped_images(dataset) -> None:
    batches = DeviceBatches(dataset, 37, mean=(0, 0, 0), std=(1, 1, 1), padding=2, seed=3)
    (images, labels), *_ = list(batches)
    order = torch.randperm(37, generator=torch.Generator().manual_seed(3))
    assert labels.tolist() == [dataset.targets[i] for i in order]
    flips = 0
    for out, i in zip(images, order.tolist()):
        padded = F.pad(dataset.images[i].float() / 255, (2, 2, 2, 2))
        crops = [padded[:, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        plain = any(torch.allclose(out, c) for c in crops)
        flipped = any(torch.allclose(out, c.flip(-1)) for c in crops)
        assert plain or flipped
        flips += flipped and not plain
    assert 5 <= flips <= 32  # about half are flipped


def test_epochs_are_seeded_and_ranks_are_disjoint(dataset) -> None:
    def first_labels(epoch: int, rank: int = 0, world: int = 1) -> list[int]:
        b = DeviceBatches(dataset, 64, mean=MEAN, std=STD, seed=1, rank=rank, world_size=world)
        b.set_epoch(epoch)
        return torch.cat([y for _, y in b]).tolist()

    assert first_labels(0) == first_labels(0) and first_labels(0) != first_labels(1)
    b0 = DeviceBatches(dataset, 64, mean=MEAN, std=STD, rank=0, world_size=2)
    b1 = DeviceBatches(dataset, 64, mean=MEAN, std=STD, rank=1, world_size=2)
    shard0, shard1 = b0._indices().tolist(), b1._indices().tolist()
    assert len(shard0) == len(shard1) == 19 and set(shard0) | set(shard1) == set(range(37))


def test_bad_arguments(dataset) -> None:
    with pytest.raises(ConfigError, match="mean/std"):
        DeviceBatches(dataset, 8, mean=(0.5,), std=(0.2,))
    with pytest.raises(ConfigError, match="decoded into memory"):
        DeviceBatches([1, 2, 3], 8, mean=MEAN, std=STD)  # type: ignore[arg-type]


def test_iter_from_continues_exactly_as_a_full_pass(dataset) -> None:
    batches = DeviceBatches(dataset, 8, mean=MEAN, std=STD, seed=5)
    batches.set_epoch(2)
    full = list(batches)
    resumed = list(batches.iter_from(3))
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], resumed))
