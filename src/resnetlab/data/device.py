"""Device-resident batches for small datasets: no DataLoader, no per-image Python in the hot loop.

CIFAR-size sets fit on any accelerator (CIFAR-10 is 150 MB as uint8). ``DeviceBatches`` keeps the uint8
images on the training device and applies the paper's recipe (zero-pad, random crop, horizontal flip)
and normalisation to a whole batch with a few tensor ops. On a GPU this removes the input pipeline as a
bottleneck for the small CIFAR nets, whose steps take milliseconds; on a CPU it is also much cheaper than
per-image transforms. Same distribution as ``cifar_train_transform``; different random draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from resnetlab.data.datasets import TensorImageDataset
from resnetlab.errors import ConfigError

#: Repeated augmentation keeps this many images per rank and epoch, rounded down to a multiple of this
#: (DeiT's RASampler, kept by torchvision's and timm's).
REPEAT_ROUND = 256


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                repeats: int = 1) -> torch.Tensor:  # fmt: skip
    """The indices of ``n`` samples that ``rank`` walks in ``epoch``: a permutation seeded by ``seed + epoch``
    (or ``0..n-1``), padded to a multiple of ``world_size`` and sharded as ``DistributedSampler`` does, so
    the ranks' batches together hold the images of one process's global batch.

    ``repeats > 1``: repeated augmentation (Hoffer et al. 2020; DeiT's RASampler): each image of the
    permutation appears ``repeats`` times in a row, dealt round-robin to the ranks (so its copies land on
    different ranks, each augmenting it its own way), and each rank keeps ``n // 256 * 256 / world_size``
    of its share, so an epoch still takes about ``n`` images in all. This is timm's ``RepeatAugSampler``
    (with ``seed=0`` the same indices, which the tests check) and torchvision's ``RASampler``.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else torch.arange(n)
    if repeats > 1:
        per_rank = math.ceil(n * repeats / world_size)
        kept = n // REPEAT_ROUND * REPEAT_ROUND // world_size if n >= REPEAT_ROUND else math.ceil(n / world_size)
        dealt = torch.arange(rank, per_rank * world_size, world_size)[: min(kept, per_rank)]
        return order.repeat_interleave(repeats)[dealt % (n * repeats)]
    if world_size > 1:
        order = torch.cat([order, order[: (-n) % world_size]])[rank::world_size]
    return order


class DeviceBatches:
    """Iterate ``(images, labels)`` batches of a ``TensorImageDataset`` held on ``device``.

    ``augment=True`` applies pad-``padding`` random crops and (``hflip``) horizontal flips per sample.
    Shuffling is seeded by ``seed + epoch`` (call ``set_epoch``), and with ``world_size > 1`` each rank
    takes a disjoint shard of the permutation, like ``DistributedSampler``.
    """

    def __init__(
        self,
        dataset: TensorImageDataset,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        augment: bool = True,
        shuffle: bool | None = None,
        padding: int = 4,
        hflip: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        if not isinstance(dataset, TensorImageDataset):
            raise ConfigError("device-resident batches need a dataset decoded into memory (CIFAR-size images)")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = torch.as_tensor(dataset.targets, dtype=torch.long, device=self.device)
        channels = self.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"mean/std need {channels} values for {channels}-channel images")
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.batch_size = batch_size
        self.augment, self.padding, self.hflip = augment, padding, hflip
        self.shuffle = augment if shuffle is None else shuffle
        self.drop_last, self.seed, self.epoch = drop_last, seed, 0
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        return epoch_order(len(self.labels), shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                           rank=self.rank, world_size=self.world_size)  # fmt: skip

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from ``start_batch`` on, exactly as a full pass would give them
        (a resumed run continues with the same crops and flips)."""
        order = self._indices()
        generator = torch.Generator().manual_seed(10_007 * (self.seed + 1) + self.epoch)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            if i < start_batch:
                if self.augment:  # draw what this batch would have drawn
                    self._draws(len(index), generator)
                continue
            images = self.images[index.to(self.device)]
            if self.augment:
                images = self._augment(images, generator)
            yield self._normalise(images), self.labels[index.to(self.device)]

    def _draws(self, b: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        high = 2 * self.padding + 1
        dy = torch.randint(0, high, (b,), generator=generator)
        dx = torch.randint(0, high, (b,), generator=generator)
        return dy, dx, torch.rand(b, generator=generator) < 0.5

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, _, h, w = images.shape
        dy, dx, flip = (t.to(self.device) for t in self._draws(b, generator))
        if self.padding:
            p = self.padding
            padded = F.pad(images, (p, p, p, p))
            rows = (dy[:, None] + torch.arange(h, device=self.device))[:, None, :, None]
            cols = (dx[:, None] + torch.arange(w, device=self.device))[:, None, None, :]
            batch = torch.arange(b, device=self.device)[:, None, None, None]
            channel = torch.arange(images.shape[1], device=self.device)[None, :, None, None]
            images = padded[batch, channel, rows, cols]
        if self.hflip:
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255 - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
