"""Preflight: everything a run would trip over that this process can see, tried before any
Ray worker starts, with the run's own builders (datasets, model, step plan, GraNet engine)
and a probe of its storage. A bad flag fails at once with one line naming the field.
"""

from __future__ import annotations

import functools

import torch

from granet_ray.config import ConfigError, RunSettings, TrainConfig
from granet_ray.data import DATASET_NAMES, DataBundle, build_datasets
from granet_ray.models import MODEL_NAMES, build_model
from granet_ray.recipe import Plan, build_optimizer, plan_run
from granet_ray.sparsity import GraNet
from granet_ray.store import open_storage

# Datasets whose files may live only on the workers (a shared mount): not read here.
WORKER_ONLY_DATA = ("imagenet",)
NEEDS_ROOT = ("cifar10", "imagenet")


@functools.lru_cache(maxsize=16)
def preflight(train: TrainConfig, num_workers: int, use_gpu: bool = False) -> Plan | None:
    """Raise ``ConfigError`` naming the field if ``train`` cannot run on ``num_workers``
    workers; returns the step plan (None for data only the workers can read). Successful
    checks are remembered, so checking again costs nothing."""
    if train.model not in MODEL_NAMES:
        raise ConfigError(f"model={train.model!r} is invalid: must be one of {MODEL_NAMES}")
    if train.dataset not in DATASET_NAMES:
        raise ConfigError(f"dataset={train.dataset!r} is invalid: must be one of {DATASET_NAMES}")
    if train.dataset in NEEDS_ROOT and not train.data_root:
        raise ConfigError(
            f"data_root=None is invalid: dataset={train.dataset!r} needs the folder that "
            "holds its files (--data-root)"
        )
    if train.sync_bn and num_workers > 1 and not use_gpu:
        raise ConfigError(
            "sync_bn=True is invalid: SyncBatchNorm runs on CUDA workers only "
            "(--gpus-per-worker > 0)"
        )
    if train.dataset in WORKER_ONLY_DATA:
        return None
    try:
        data = build_datasets(
            train.dataset, train.data_root, train_size=train.train_size, seed=train.seed
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise ConfigError(str(err)) from None  # the data builders name the field
    return _check_model(train, num_workers, data)


def _check_model(train: TrainConfig, num_workers: int, data: DataBundle) -> Plan:
    """The model accepts the dataset's images, the global batch feeds every worker, and the
    engine's schedule holds at the real number of steps per epoch."""
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
    plan = plan_run(train, len(data.train), num_workers)  # type: ignore[arg-type]
    GraNet(
        model,
        build_optimizer(model, train),
        train.granet,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
    )
    return plan


def check_storage(run: RunSettings) -> None:
    """The run's storage is reachable, accepts its credentials and is writable (a small
    probe object written and deleted); raises the store's ``StorageError`` kinds."""
    open_storage(run.storage_path, run.storage_options).probe()
