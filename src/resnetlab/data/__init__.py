"""Datasets, image loading and transforms: ``build_data(source) -> DataBundle`` is the entry point."""

from resnetlab.data.builder import DataBundle, build_data, channel_stats
from resnetlab.data.cifar import CIFAR100_MEAN, CIFAR100_STD
from resnetlab.data.datasets import ImageDataset, LazyImageDataset, TensorImageDataset, stratified_split
from resnetlab.data.images import MAX_IMAGE_PIXELS, load_image, probe_image
from resnetlab.data.stores import open_store
from resnetlab.data.transforms import (
    cifar_train_transform,
    eval_transform,
    imagenet_train_transform,
    mixup_cutmix,
)
from resnetlab.models.config import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from resnetlab.models.hub import CIFAR10_CLASSES  # the class names published CIFAR weights predict

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN",
    "IMAGENET_STD", "MAX_IMAGE_PIXELS", "DataBundle", "ImageDataset", "LazyImageDataset", "TensorImageDataset",
    "build_data", "channel_stats", "cifar_train_transform", "eval_transform", "imagenet_train_transform",
    "load_image", "mixup_cutmix", "open_store", "probe_image", "stratified_split",
]  # fmt: skip
