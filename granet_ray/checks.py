"""Checks before a run: everything it would trip over that this process can see, tried before
any Ray worker starts, with the run's own builders (datasets, model, step plan, GraNet engine),
and a probe of its storage. A bad value fails at once with one line naming the field. Each
check runs once per ``fit`` or sweep: their callers pass the results down.
"""

from __future__ import annotations

from granet_ray.config import ConfigError, RunSettings, TrainConfig
from granet_ray.data import check_dataset_name
from granet_ray.data.packed import probe_packed
from granet_ray.models import build_model, check_model_name
from granet_ray.recipe import Plan, build_optimizer, check_model_input, load_data, plan_run
from granet_ray.sparsity import GraNet
from granet_ray.store import open_storage
from granet_ray.store.dataset import is_packed

# Datasets whose files may live only on the workers (a shared mount): not read here.
WORKER_ONLY_DATA = ("imagenet",)
NEEDS_ROOT = ("cifar10", "imagenet")


def check_request(train: TrainConfig, num_workers: int, use_gpu: bool = False) -> None:
    """The checks that build nothing: names of model and dataset (a reference
    ``pkg.module:factory`` is imported and must be callable; ``timm:<name>`` needs timm and
    a model of that name), a data folder where one is needed, options that need GPU workers.
    Raises ``ConfigError`` naming the field."""
    check_model_name(train.model)
    check_dataset_name(train.dataset)
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


def preflight(train: TrainConfig, num_workers: int, use_gpu: bool = False) -> Plan | None:
    """Raise ``ConfigError`` naming the field if ``train`` cannot run on ``num_workers``
    workers: ``check_request``, then the real datasets, model, step plan and engine built
    here once. Returns the step plan (None for data only the workers can read). For a
    process that goes on to train itself, ``check_request`` and ``recipe.build_run`` do
    the same checks without building anything twice."""
    check_request(train, num_workers, use_gpu)
    if train.dataset in WORKER_ONLY_DATA or is_packed(train.data_root):
        return None  # packed data: check_data reads its index with the run's data options
    data = load_data(train)
    model = build_model(train.model, num_classes=data.num_classes)
    check_model_input(model, data, train)
    plan = plan_run(train, len(data.train), num_workers)  # type: ignore[arg-type]
    GraNet(
        model,
        build_optimizer(model, train),
        train.granet,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
    )
    return plan


def check_data(train: TrainConfig, settings: RunSettings) -> None:
    """A packed ``data_root`` (``s3://`` or a folder with an ``index.json``) is reachable
    with ``settings.data_options``, its index valid, its first shard verifies and
    ``train_size`` and the step plan fit (within seconds); raises ``DatasetError`` or the
    store's ``StorageError`` kinds naming the URI or shard, ``ConfigError`` for
    ``train_size`` or the plan. Other data is checked by ``preflight``."""
    if not is_packed(train.data_root):
        return
    try:
        index = probe_packed(str(train.data_root), settings.data_options, train.train_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    size = train.train_size or sum(e.samples for e in index.shards("train"))
    plan_run(train, size, settings.num_workers)


def check_storage(settings: RunSettings) -> None:
    """The run's storage is reachable, accepts its credentials and is writable (a small
    probe object written and deleted); raises the store's ``StorageError`` kinds."""
    open_storage(settings.storage_path, settings.storage_options).probe()
