"""Does pretraining help on small data? Measured on the real data (docs/results/transfer.md).

1. Pretraining on five CIFAR-10 classes, then fine-tuning on 20 images per class of the other five,
   beats the same network trained from scratch on those 100 images (a CPU-sized version of the
   documented run: 66.7% against 49.4% there, over 6 seeds).
2. The published CIFAR-10 ResNet-20's embeddings rank ants/bees photos (32 px) better than the same
   network's embeddings at random init: its nearest train image has the query's class more often
   (k-NN with k=1, i.e. precision@1 of `resnetlab similar`): 63.4% against 54.3-58.8% for six random
   inits (seeds 0-5), 56.2% for the two used here, so the asserted 3-point margin holds with room.

What does NOT hold, so is not asserted: fine-tuning that CIFAR-10 network on ants/bees beats training
it from scratch. Over every budget, subset, strategy and input size measured, scratch was as good or
better (docs/results/transfer.md).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import resnetlab
from resnetlab.data import build_data
from resnetlab.inference import Predictor
from resnetlab.models.config import IMAGENET_MEAN, IMAGENET_STD
from resnetlab.train import load_recipe, train
from resnetlab.transfer import FinetuneStrategy, finetune
from resnetlab.transfer.features import Embeddings, pooled_features, probe_embeddings

RANDOM_SEEDS = (0, 1)
MARGIN = 3.0  # points of k-NN@1 accuracy; measured 7.2 (see above)


def _photos(archive: Path, root: Path, split: str) -> list[Path]:
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if f"/{split}/" in n and n.lower().endswith((".jpg", ".jpeg"))]
        zf.extractall(root, members=names)
    return sorted(root / n for n in names)


def _embed(model: resnetlab.ResNet, batch: torch.Tensor, files: list[Path]) -> Embeddings:
    with torch.no_grad():
        vectors = pooled_features(model.eval(), batch).numpy()
    return Embeddings(vectors, [str(f) for f in files])


@pytest.mark.slow
def test_cifar10_pretrained_embeddings_retrieve_ants_and_bees_better_than_random_ones(
    shared_file, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RESNETLAB_WEIGHTS_PATH", str(shared_file("weights/cifar10-akamaster").resolve()))
    archive = shared_file("data/hymenoptera.zip")
    pretrained = resnetlab.create_model("resnet20", pretrained="cifar10_akamaster")
    predictor = Predictor(pretrained)  # 32 px, ImageNet mean/std: the preprocessing the weights were trained with
    splits = {split: _photos(archive, tmp_path, split) for split in ("train", "val")}
    assert [len(files) for files in splits.values()] == [244, 153]
    batches = {split: torch.stack([predictor.preprocess(f) for f in files]) for split, files in splits.items()}

    def knn1(model: resnetlab.ResNet) -> float:
        train, val = (_embed(model, batches[s], splits[s]) for s in ("train", "val"))
        return probe_embeddings(train, val, ks=(1,))["knn"]["1"]

    ours = knn1(pretrained)
    baselines = []
    for seed in RANDOM_SEEDS:
        torch.manual_seed(seed)
        baselines.append(knn1(resnetlab.create_model("resnet20", mean=IMAGENET_MEAN, std=IMAGENET_STD)))
    assert ours >= max(baselines) + MARGIN, (ours, baselines)
    assert ours > 100 * np.mean([f.parent.name == "bees" for f in splits["val"]])  # beats a constant answer


PRETRAIN_STEPS = 300  # batch 128: 1.5 epochs of the five source classes, 2-3 minutes on 2 cores
TRANSFER_MARGIN = 3.0  # points of top-1, mean over seeds; measured 8.2 (docs/results/transfer.md)


@pytest.mark.slow
def test_pretraining_on_five_cifar10_classes_beats_scratch_on_few_images_of_the_other_five(
    shared_file, tmp_path: Path
) -> None:
    cifar = build_data(shared_file("data/cifar10-jpeg.tar.xz"))
    source = cifar.select_classes(cifar.classes[:5], eval_per_class=100)  # airplane .. deer
    target = cifar.select_classes(cifar.classes[5:], train_per_class=20)  # dog .. truck; all 5,000 test images
    common = dict(model="resnet20", progress=False, num_workers=0, tensorboard=False)
    pretrain = load_recipe("cifar-paper", max_iters=PRETRAIN_STEPS, batch_size=128, schedule="cosine",
                           warmup_iters=PRETRAIN_STEPS // 10, eval_every=PRETRAIN_STEPS, seed=0,
                           run_dir=str(tmp_path / "pretrain"), **common)  # fmt: skip
    source_accuracy = train(pretrain, bundle=source).final_accuracy
    assert source_accuracy > 40  # it learned its own five classes (chance: 20%)

    def finetuned(pretrained: str | None, seed: int) -> float:
        run_dir = tmp_path / f"{'pretrained' if pretrained else 'scratch'}-{seed}"
        cfg = load_recipe("finetune", pretrained=pretrained, image_size=32, epochs=30, batch_size=32, seed=seed,
                          eval_every=10**6, run_dir=str(run_dir), **common)  # fmt: skip
        return finetune(cfg, FinetuneStrategy(), bundle=target).final_accuracy

    seeds = (0, 1, 2)  # a seed fixes both arms' head init, batch order and augmentation: paired runs
    with_pretraining = [finetuned(str(tmp_path / "pretrain" / "model"), seed) for seed in seeds]
    from_scratch = [finetuned(None, seed) for seed in seeds]
    print(f"source {source_accuracy:.1f}%, target: pretrained {with_pretraining}, scratch {from_scratch}")
    assert all(p > s for p, s in zip(with_pretraining, from_scratch)), (with_pretraining, from_scratch)
    assert np.mean(with_pretraining) >= np.mean(from_scratch) + TRANSFER_MARGIN, (with_pretraining, from_scratch)
