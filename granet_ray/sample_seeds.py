"""Random augmentation that resumes exactly with data-loader processes.

A loader process draws its augmentation from its own RNG, which lives only as long as the
process: a resumed run starts new processes, so its augmentation would differ from the
uninterrupted run's. Here every training sample's draws come from RNGs seeded by
(run seed, epoch, sample index) in the loader process just before the sample is loaded:
the same sample of the same epoch is augmented the same way in any process, before or after
a resume, and the loader processes need no state restored. Used when a run has
``loader_workers > 0`` (without them, augmentation draws from the training process's RNG,
which a checkpoint restores).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from granet_ray.data.sharding import MicroBatchSampler


def seed_sample(seed: int, epoch: int, index: int) -> None:
    """Seed this process's torch, Python and NumPy RNGs for sample ``index`` of ``epoch``."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)
    torch.manual_seed(int(state[0]))
    random.seed(int(state[1]))
    np.random.seed(int(state[1]) % 2**32)


class EpochSampler(MicroBatchSampler):
    """``MicroBatchSampler`` whose micro-batches hold ``(epoch, index)`` keys for
    ``SampleSeeded``; ``epoch`` is set with ``shares`` before every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0

    def __iter__(self) -> Iterator[list[Any]]:
        for batch in super().__iter__():
            yield [(self.epoch, index) for index in batch]


class SampleSeeded(Dataset):
    """``dataset`` loaded by ``(epoch, index)`` keys, each sample after ``seed_sample``."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        seed_sample(self.seed, epoch, index)
        return self.dataset[index]
