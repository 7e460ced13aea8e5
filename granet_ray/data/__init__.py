"""Dataset builders by name (``build_datasets("mnist5k")``) or a user's factory by reference
(``build_datasets("mypkg.data:build")``, see ``granet_ray.data.reference``)."""

from __future__ import annotations

import os
from pathlib import Path

from granet_ray.data.bundle import DataBundle
from granet_ray.data.mnist5k import build_mnist5k
from granet_ray.data.packed import PackedDataset, StreamOptions, build_packed_vision
from granet_ray.data.reference import build_reference_datasets
from granet_ray.data.synthetic import LIKE, SyntheticImages, build_synthetic
from granet_ray.data.vision import build_cifar10, build_imagenet
from granet_ray.reference import invalid, is_reference, load_reference
from granet_ray.store.dataset import is_packed

DATASET_NAMES: tuple[str, ...] = (
    "mnist5k",
    "cifar10",
    "imagenet",
    *(f"synthetic_{n}" for n in LIKE),
)


def check_dataset_name(name: str) -> None:
    """``ConfigError`` naming ``dataset`` unless ``name`` is one of ``DATASET_NAMES`` or a
    ``pkg.module:factory`` that imports to a callable. Builds nothing."""
    if name in DATASET_NAMES:
        return
    if not is_reference(name):
        raise invalid(
            "dataset", name, f"must be one of {', '.join(DATASET_NAMES)} or pkg.module:factory"
        )
    load_reference("dataset", name)


def build_datasets(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    train_size: int | None = None,
    seed: int = 0,
    stream: StreamOptions | None = None,
) -> DataBundle:
    """Build the train and test splits of ``name`` (one of ``DATASET_NAMES``, or a reference
    ``pkg.module:factory``: ``factory(root=root, seed=seed)`` returning ``(train, test,
    num_classes)`` or a ``DataBundle``, checked by ``granet_ray.data.reference``).

    - ``mnist5k``: 5,000 MNIST digits shipped in the package, 4,000 train / 1,000 test.
    - ``cifar10``: torchvision CIFAR-10 under ``root``; ``download`` fetches it if missing.
    - ``imagenet``: ImageFolder trees ``root/train`` and ``root/val``.
    - ``synthetic_imagenet``, ``synthetic_cifar10``, ``synthetic_mnist5k``: random images in
      that dataset's shape and class count, ``train_size`` (default 256) train and 64 test.

    ``train_size`` keeps the first N training samples after a shuffle by ``seed`` (for
    synthetic_imagenet it is the size). ``root`` is required by cifar10 and imagenet and
    ignored by the others; nothing is downloaded unless ``download`` is True.

    A ``root`` that is ``s3://bucket/prefix`` or a folder holding a packed dataset's
    ``index.json`` (``granet-ray data pack``) is streamed for cifar10 and imagenet
    (``data.packed``, read as ``stream`` says; ``train_size`` keeps the first N of the
    pack's shuffled samples).
    """
    if is_reference(name):
        if download:
            raise ValueError(f"dataset {name!r} is a reference: its factory gets its own files")
        return build_reference_datasets(
            name, None if root is None else str(root), train_size=train_size, seed=seed
        )
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    if name == "mnist5k":
        return build_mnist5k(train_size, seed)
    if name.startswith("synthetic_"):
        return build_synthetic(name.removeprefix("synthetic_"), train_size, seed)
    if root is None:
        raise ValueError(f"dataset {name!r} needs root, the folder that holds its files")
    if is_packed(root):
        return build_packed_vision(name, os.fspath(root), train_size, stream)
    if name == "cifar10":
        return build_cifar10(Path(root), download, train_size, seed)
    if download:
        raise ValueError("dataset 'imagenet' cannot be downloaded; place it under root")
    return build_imagenet(Path(root), train_size, seed)


__all__ = [
    "DATASET_NAMES",
    "DataBundle",
    "PackedDataset",
    "StreamOptions",
    "SyntheticImages",
    "build_datasets",
    "check_dataset_name",
]
