"""Checks a run's configuration on the driver, before any Ray worker starts.

Everything a worker would trip over that the driver can see is tried here with the real
code (dataset builder, model builder, the GraNet engine's schedule checks), so a bad flag
or config fails at once with a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import functools
import math

import torch

from granet_ray.config import ConfigError, TrainConfig
from granet_ray.data import DATASET_NAMES, DataBundle, build_datasets
from granet_ray.loop import build_optimizer
from granet_ray.models import MODEL_NAMES, build_model
from granet_ray.sparsity import GraNet

# Datasets whose files may live only on the workers (a shared mount): not read here.
WORKER_ONLY_DATA = ("imagenet",)
NEEDS_ROOT = ("cifar10", "imagenet")


def steps_per_epoch(train_size: int, batch_size: int, num_workers: int) -> int:
    """Optimizer steps per epoch on each worker: the length of its training loader (the
    ``DistributedSampler`` pads the shards to equal size)."""
    return math.ceil(math.ceil(train_size / num_workers) / batch_size)


@functools.lru_cache(maxsize=16)
def preflight(train: TrainConfig, num_workers: int) -> None:
    """Raise ``ConfigError`` naming the field if ``train`` cannot run on ``num_workers``
    workers. Successful checks are remembered, so a job may check before contacting Ray
    and ``build_trainer`` again at no cost."""
    if train.model not in MODEL_NAMES:
        raise ConfigError(f"model={train.model!r} is invalid: must be one of {MODEL_NAMES}")
    if train.dataset not in DATASET_NAMES:
        raise ConfigError(f"dataset={train.dataset!r} is invalid: must be one of {DATASET_NAMES}")
    if train.dataset in NEEDS_ROOT and not train.data_root:
        raise ConfigError(
            f"data_root=None is invalid: dataset={train.dataset!r} needs the folder that "
            "holds its files"
        )
    if train.dataset in WORKER_ONLY_DATA:
        return
    try:
        data = build_datasets(
            train.dataset, train.data_root, train_size=train.train_size, seed=train.seed
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise ConfigError(str(err)) from None  # the data builders name the field
    _check_model(train, num_workers, data)


def _check_model(train: TrainConfig, num_workers: int, data: DataBundle) -> None:
    """The model accepts the dataset's images, and the engine's schedule holds at the real
    number of steps per epoch."""
    model = build_model(train.model, num_classes=data.num_classes)
    model.eval()
    images = torch.stack([data.test[i][0] for i in range(min(2, len(data.test)))])
    try:
        with torch.no_grad():
            model(images)
    except RuntimeError as err:
        raise ConfigError(
            f"model={train.model!r} does not accept dataset={train.dataset!r} images of shape "
            f"{tuple(data.input_shape)}: {str(err).splitlines()[0]}"
        ) from None
    steps = steps_per_epoch(len(data.train), train.batch_size, num_workers)
    GraNet(
        model,
        build_optimizer(model, train),
        train.granet,
        total_steps=steps * train.epochs,
        steps_per_epoch=steps,
    )
