"""Random images in a real dataset's shape for smoke runs without it, generated per index."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from granet_ray.data.bundle import DataBundle, check_positive_int

DEFAULT_TRAIN_SIZE = 256
TEST_SIZE = 64
NUM_CLASSES = 1000
SHAPE = (3, 224, 224)


class SyntheticImages(Dataset):
    """``size`` samples of standard-normal float32 images and uniform int labels.

    Sample i is drawn from a generator seeded by ``(seed, split, i)``, so it is the same on
    every call and in every process, and nothing is held in memory.
    """

    def __init__(
        self,
        size: int,
        seed: int,
        split: int,
        num_classes: int = NUM_CLASSES,
        shape: tuple[int, int, int] = SHAPE,
    ) -> None:
        self.size = size
        self.seed = seed
        self.split = split
        self.num_classes = num_classes
        self.shape = shape

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(image of ``shape``, label in [0, num_classes))."""
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        index %= self.size
        rng = np.random.default_rng([self.seed, self.split, index])
        image = torch.from_numpy(rng.standard_normal(self.shape, dtype=np.float32))
        return image, int(rng.integers(self.num_classes))


# The real dataset each synthetic one stands in for: (input shape, number of classes).
LIKE: dict[str, tuple[tuple[int, int, int], int]] = {
    "imagenet": (SHAPE, NUM_CLASSES),
    "cifar10": ((3, 32, 32), 10),
    "mnist5k": ((1, 28, 28), 10),
}


def build_synthetic(like: str, train_size: int | None, seed: int) -> DataBundle:
    """Random images in the shape and class count of dataset ``like`` (a key of ``LIKE``):
    ``train_size`` (default 256) training and 64 test samples."""
    shape, classes = LIKE[like]
    size = DEFAULT_TRAIN_SIZE if train_size is None else train_size
    check_positive_int(size, "train_size")
    return DataBundle(
        train=SyntheticImages(size, seed, split=0, num_classes=classes, shape=shape),
        test=SyntheticImages(TEST_SIZE, seed, split=1, num_classes=classes, shape=shape),
        num_classes=classes,
        input_shape=shape,
    )
