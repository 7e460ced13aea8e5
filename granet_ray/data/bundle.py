"""The result type of ``build_datasets`` and helpers shared by the dataset builders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset, Subset


@dataclass(frozen=True)
class DataBundle:
    """Train and test splits of one dataset.

    Each item is ``(input, label)``: a tensor of ``input_shape`` ((C, H, W) for the built-in
    image datasets; any shape for a dataset by reference) and an int class index in
    ``[0, num_classes)``.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]


def check_positive_int(value: int, what: str) -> None:
    """Raise ValueError unless ``value`` is an int >= 1 (``what`` names it in the message)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def check_train_size(train_size: int | None, available: int, name: str) -> None:
    """Raise ValueError unless ``train_size`` is None or an int in ``[1, available]``."""
    if train_size is None:
        return
    check_positive_int(train_size, "train_size")
    if train_size > available:
        raise ValueError(
            f"train_size={train_size} is larger than the {available} training samples of {name!r}"
        )


def shuffled_subset(dataset: Dataset, train_size: int | None, seed: int, name: str) -> Dataset:
    """The first ``train_size`` samples of ``dataset`` in an order shuffled by ``seed``.

    Returns ``dataset`` itself when ``train_size`` is None.
    """
    n = len(dataset)  # type: ignore[arg-type]
    check_train_size(train_size, n, name)
    if train_size is None:
        return dataset
    order = np.random.default_rng(seed).permutation(n)[:train_size]
    return Subset(dataset, order.tolist())
