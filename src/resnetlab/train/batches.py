"""The training split as batches, walked in seeded per-epoch orders that can start part-way through an
epoch (so a resumed run sees exactly the batches the uninterrupted one would have)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from resnetlab.data import DataBundle, TensorImageDataset
from resnetlab.data.device import DeviceBatches, epoch_order
from resnetlab.train import distributed as dist
from resnetlab.train.config import TrainConfig


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded across ranks like DistributedSampler (or with repeated
    augmentation, ``repeats``), that can start part-way through an epoch (for exact resumption)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 repeats: int = 1) -> None:  # fmt: skip
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.repeats = repeats  # repeated augmentation (see epoch_order)
        self.epoch, self.start = 0, 0

    def indices(self) -> list[int]:
        return epoch_order(self.n, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch, rank=self.rank,
                           world_size=self.world_size, repeats=self.repeats).tolist()  # fmt: skip

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :])

    def __len__(self) -> int:
        return len(self.indices()) - self.start


class TrainBatches:
    """The training split as batches: device-resident for in-memory datasets, a DataLoader otherwise."""

    def __init__(self, cfg: TrainConfig, bundle: DataBundle, device: torch.device, per_rank_batch: int) -> None:
        self.device = device
        self.per_rank_batch = per_rank_batch
        train = bundle.train
        rank, world = dist.rank(), dist.world_size()
        self.on_device = (
            cfg.data_on_device and isinstance(train, TensorImageDataset) and bundle.augment in ("cifar", "none")
            and not cfg.auto_augment and not cfg.random_erasing and cfg.repeated_aug == 1
        )  # fmt: skip
        if self.on_device:
            self.batches = DeviceBatches(
                train, per_rank_batch, mean=bundle.mean, std=bundle.std, device=device,
                augment=bundle.augment == "cifar", shuffle=True, padding=bundle.image_size // 8,
                hflip=bundle.hflip, drop_last=True, seed=cfg.seed, rank=rank, world_size=world,
            )  # fmt: skip
            return
        self.sampler = EpochSampler(len(train), shuffle=True, seed=cfg.seed, rank=rank, world_size=world,
                                    repeats=cfg.repeated_aug)  # fmt: skip
        # The loader's own generator seeds its workers, so creating it mid-epoch on resume draws nothing
        # from the global RNG that the uninterrupted run would not have drawn.
        self.generator, self.seed = torch.Generator(), cfg.seed
        self.loader = DataLoader(
            train, batch_size=per_rank_batch, sampler=self.sampler, drop_last=True,
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda", generator=self.generator,
        )  # fmt: skip

    def __len__(self) -> int:
        if self.on_device:
            return len(self.batches)
        return len(self.sampler.indices()) // self.per_rank_batch

    def epoch(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.on_device:
            self.batches.set_epoch(epoch)
            yield from self.batches.iter_from(start_batch)
            return
        self.sampler.epoch, self.sampler.start = epoch, start_batch * self.per_rank_batch
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
