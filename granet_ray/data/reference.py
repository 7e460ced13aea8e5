"""A user's datasets by reference: ``pkg.module:factory`` is called as
``factory(root=<data_root or None>, seed=<seed>)`` and returns ``(train, test, num_classes)``
or a ``DataBundle``. Both splits must be map-style datasets (``__len__`` and
``__getitem__``) of ``(input_tensor, int_label)`` with labels in ``[0, num_classes)``;
inputs may have any shape (images, token sequences, features), the same in every sample.

The checks read a few samples of each split (the first, the last and some between) and,
when a split exposes its labels as ``targets`` or ``labels`` (as torchvision's datasets do),
every label; each failure is one ``ConfigError`` naming the reference.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from granet_ray.data.bundle import DataBundle, shuffled_subset
from granet_ray.reference import call_factory, invalid, load_reference

# Samples of each split read by the checks, spread from the first to the last.
CHECKED_SAMPLES = 8


def _label(value: Any) -> int | None:
    """``value`` as an int class index, or None when it is not an integer."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            return None
        return int(value.item())
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return None


def _positions(size: int) -> list[int]:
    return sorted({round(i * (size - 1) / (CHECKED_SAMPLES - 1)) for i in range(CHECKED_SAMPLES)})


def _all_labels(split: Any, size: int) -> np.ndarray | None:
    """Every label of ``split`` when it exposes them (``targets`` / ``labels`` of its
    length), else None."""
    for attr in ("targets", "labels"):
        values = getattr(split, attr, None)
        if isinstance(values, (torch.Tensor, np.ndarray, Sequence)) and not isinstance(values, str):
            array = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
            if array.shape == (size,) and np.issubdtype(array.dtype, np.integer):
                return array
    return None


def check_split(reference: str, which: str, split: Any, num_classes: int) -> tuple[int, ...]:
    """Check one split (``which``: train or test); returns its inputs' shape."""
    if isinstance(split, IterableDataset) or not hasattr(split, "__getitem__"):
        raise invalid(
            "dataset",
            reference,
            f"the {which} split is a {type(split).__name__}, not a map-style dataset "
            "(__len__ and __getitem__)",
        )
    try:
        size = len(split)
    except TypeError:
        raise invalid(
            "dataset", reference, f"the {which} split ({type(split).__name__}) has no __len__"
        ) from None
    if size < 1:
        raise invalid("dataset", reference, f"the {which} split is empty")
    shape: tuple[int, ...] | None = None
    for index in _positions(size):
        try:
            item = split[index]
        except Exception as err:
            raise invalid(
                "dataset", reference, f"{which}[{index}] raised {type(err).__name__}: {err}"
            ) from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise invalid(
                "dataset",
                reference,
                f"{which}[{index}] is a {type(item).__name__}, not (input_tensor, int_label)",
            )
        inputs, target = item
        if not isinstance(inputs, torch.Tensor):
            raise invalid(
                "dataset",
                reference,
                f"the input of {which}[{index}] is a {type(inputs).__name__}, not a torch.Tensor",
            )
        if shape is None:
            shape = tuple(inputs.shape)
        elif tuple(inputs.shape) != shape:
            raise invalid(
                "dataset",
                reference,
                f"inputs differ in shape: {which}[0] {list(shape)}, {which}[{index}] "
                f"{list(inputs.shape)}",
            )
        label = _label(target)
        if label is None:
            raise invalid(
                "dataset",
                reference,
                f"the label of {which}[{index}] is {target!r}, not an int class index",
            )
        if not 0 <= label < num_classes:
            raise invalid(
                "dataset",
                reference,
                f"the label of {which}[{index}] is {label}, outside [0, num_classes={num_classes})",
            )
    labels = _all_labels(split, size)
    if labels is not None:
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            raise invalid(
                "dataset",
                reference,
                f"{which} label {int(labels[bad[0]])} (sample {int(bad[0])}) is outside "
                f"[0, num_classes={num_classes})",
            )
    assert shape is not None
    return shape


def build_reference_datasets(
    reference: str, root: str | None, *, train_size: int | None, seed: int
) -> DataBundle:
    """The datasets of the factory ``reference`` names, checked (see the module's doc);
    ``train_size`` keeps the first N training samples after a shuffle by ``seed``."""
    factory = load_reference("dataset", reference)
    result = call_factory("dataset", reference, factory, root=root, seed=seed)
    if isinstance(result, DataBundle):
        train, test, num_classes = result.train, result.test, result.num_classes
    elif isinstance(result, (tuple, list)) and len(result) == 3:
        train, test, num_classes = result
    else:
        raise invalid(
            "dataset",
            reference,
            f"the factory returned a {type(result).__name__}, not (train_dataset, "
            "test_dataset, num_classes) or a DataBundle",
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise invalid(
            "dataset", reference, f"num_classes={num_classes!r} is not a positive integer"
        )
    if num_classes < 1:
        raise invalid("dataset", reference, f"num_classes={num_classes} is not a positive integer")
    num_classes = int(num_classes)
    shape = check_split(reference, "train", train, num_classes)
    test_shape = check_split(reference, "test", test, num_classes)
    if test_shape != shape:
        raise invalid(
            "dataset",
            reference,
            f"train inputs have shape {list(shape)} and test inputs {list(test_shape)}",
        )
    train_set: Dataset = shuffled_subset(train, train_size, seed, reference)
    return DataBundle(train=train_set, test=test, num_classes=num_classes, input_shape=shape)


__all__ = ["build_reference_datasets", "check_split"]
