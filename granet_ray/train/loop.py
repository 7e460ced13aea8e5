"""GraNet inside your own Ray Train loop, in the style of ``ray.train.torch.prepare_model``.

For users who already have a ``train_loop_per_worker`` (any model, any loss, any data
pipeline): three calls give it what ``granet-ray fit`` has.

- ``prepare_engine(model, optimizer, config, total_steps=...)``: the GraNet engine wired for
  the worker group: scores averaged across workers and masks compared exactly after every
  update (``DistributedSync``), and the sparse all-reduce registered when the model is in
  DDP. Call ``engine.step()`` after every ``optimizer.step()``.
- ``report(metrics, model=..., engine=..., optimizer=...)``: ``ray.train.report`` with an
  Arrow CSR checkpoint (``save_sparse``) written by rank 0 alone; every worker calls it.
- ``restore(model, optimizer, engine)``: on a restart (a worker died), model, optimizer,
  engine (masks, step counter, history) and optionally LR scheduler and GradScaler from the
  newest checkpoint: ``ray.train.get_checkpoint()``, or a newer one of the run's folder that
  Ray had not registered yet when the worker died; returns the JSON ``state`` the loop
  reported (e.g. its step), or None on a fresh start.

The checkpoint is the store's format, so ``granet_ray.load_sparse(path, model=...)`` opens
it in any process, and ``granet-ray ckpt inspect`` shows it. ``examples/own_loop_transformer.py``
uses all three.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray.train
import torch
from torch import nn

from granet_ray.config import ConfigError, GraNetConfig
from granet_ray.distributed import DistributedSync, register_sparse_allreduce
from granet_ray.sparsity import GraNet, unwrap
from granet_ray.store import (
    latest_checkpoint,
    load_sparse,
    optimizer_state_by_name,
    optimizer_state_from_names,
    save_sparse,
)

LOOP_METADATA_KIND = "granet-ray-loop"


def prepare_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: GraNetConfig,
    *,
    total_steps: int,
    steps_per_epoch: int = 1,
    sparse_allreduce: bool = True,
) -> GraNet:
    """The GraNet engine of this Ray Train worker's ``model``.

    Call it on every worker after ``ray.train.torch.prepare_model`` (which gives every worker
    rank 0's initial weights) and after building the optimizer; the engine applies its initial
    masks at once, seeded by ``config.seed`` alone, so every worker starts from the same masks.

    Args:
        model: the model, plain or as ``prepare_model`` returned it (DDP).
        optimizer: its optimizer (SGD, Adam, AdamW, RMSprop, Adagrad); the engine masks its
            weight-shaped state with the weights.
        config: the method and schedule. Its ``prune_start``, ``prune_end`` and
            ``regrow_end`` are in epochs of ``steps_per_epoch`` optimizer steps.
        total_steps: optimizer steps of the whole run (every worker counts the same steps).
        steps_per_epoch: optimizer steps per epoch; 1 (the default) reads the schedule's
            epochs as steps.
        sparse_allreduce: under DDP, all-reduce only the active weights' gradients between
            mask updates (``distributed.SparseAllReduce``).

    Returns:
        The engine: call ``engine.step()`` after every ``optimizer.step()``.
    """
    world = ray.train.get_context().get_world_size()
    engine = GraNet(
        model,
        optimizer,
        config,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        sync=DistributedSync() if world > 1 else None,
    )
    if sparse_allreduce:
        register_sparse_allreduce(model, engine)
    return engine


def _device(model: nn.Module) -> torch.device:
    return next(iter(unwrap(model).parameters())).device


def report(
    metrics: Mapping[str, Any],
    *,
    model: nn.Module,
    engine: GraNet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    state: Mapping[str, Any] | None = None,
    checkpoint: bool = True,
) -> None:
    """``ray.train.report(metrics)`` with a sparse checkpoint; every worker calls it.

    Rank 0 writes the plain model's weights (masked weights as CSR), the engine's masks and
    state, the optimizer state by parameter name, the scheduler and scaler states and
    ``state`` (JSON: what the loop needs to continue, e.g. its step) into a temporary folder
    that Ray copies into the run's storage, named ``checkpoint_step_<engine step>``.

    Args:
        metrics: this report's metrics (rank 0's are the run's).
        model, engine, optimizer: what the checkpoint holds.
        scheduler, scaler: also saved when given.
        state: JSON-able values ``restore`` hands back.
        checkpoint: False reports the metrics alone.
    """
    if not checkpoint:
        ray.train.report(dict(metrics))
        return

    def write(path: str) -> None:
        net = unwrap(model)
        engine_state = {k: v for k, v in engine.state_dict().items() if k != "masks"}
        metadata = {
            "kind": LOOP_METADATA_KIND,
            "step": engine.step_count,
            "engine": engine_state,
            "summary": engine.summary(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "state": dict(state or {}),
        }
        save_sparse(
            net.state_dict(),
            path,
            masks=engine.masks,
            metadata=metadata,
            optimizer_state=optimizer_state_by_name(optimizer, net.named_parameters()),
        )

    report_checkpoint(metrics, f"checkpoint_step_{engine.step_count:08d}", write)


def report_checkpoint(
    metrics: Mapping[str, Any], name: str, write: Callable[[str], object]
) -> None:
    """``ray.train.report(metrics)`` with a checkpoint named ``name`` that rank 0 alone writes
    (``write(path)``) into a temporary folder Ray copies into the run's storage; the other
    workers report the metrics under the same name. Every worker calls it."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(dict(metrics), checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="granet-ckpt-") as tmp:
        path = str(Path(tmp, name))
        write(path)
        ray.train.report(
            dict(metrics),
            checkpoint=ray.train.Checkpoint.from_directory(path),
            checkpoint_dir_name=name,
        )


def _run_folder() -> str | None:
    """The run's folder in Ray's storage when that is a local (or shared, mounted) folder."""
    storage = ray.train.get_context().get_storage()
    filesystem = getattr(storage, "storage_filesystem", None)
    if type(filesystem).__name__ != "LocalFileSystem":
        return None
    return getattr(storage, "experiment_fs_path", None)


def restore(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    engine: GraNet,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    run_folder: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Restore from the run's newest checkpoint on every worker: weights, optimizer state,
    the engine's masks, step counter and history, and the scheduler and scaler when given.
    Call it after ``prepare_engine``.

    The newest checkpoint is the newest committed one (by engine step) in the run's folder,
    which may be newer than ``ray.train.get_checkpoint()`` when a worker died before Ray
    registered the last report, else Ray's. Like ``granet-ray fit``, a run started again
    under a name that holds checkpoints continues from them.

    Args:
        model, optimizer, engine: what ``report`` saved, built as for a fresh start.
        scheduler, scaler: restored too when given.
        run_folder: the run's folder (``<storage_path>/<name>``, local or ``s3://``); None:
            Ray's when its storage is a local or mounted folder, else only Ray's checkpoint.
        storage_options: for an ``s3://`` ``run_folder`` (key, secret, endpoint_url).

    Returns:
        The ``state`` the loop reported with that checkpoint, or None when there is none (a
        fresh start: nothing changes).

    Raises:
        ConfigError: the newest checkpoint was not written by ``report``.
    """
    folder = run_folder if run_folder is not None else _run_folder()
    newest = None if folder is None else latest_checkpoint(folder, storage_options)
    net = unwrap(model)
    if newest is not None:
        loaded = load_sparse(
            newest, model=net, map_location=_device(model), storage_options=storage_options
        )
    else:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            loaded = load_sparse(path, model=net, map_location=_device(model))
    meta = loaded.metadata
    if meta.get("kind") != LOOP_METADATA_KIND:
        raise ConfigError(
            f"{loaded.uri} was not written by granet_ray.train.report (its kind is "
            f"{meta.get('kind')!r}): give the run a new name"
        )
    if loaded.optimizer_state is not None:
        optimizer.load_state_dict(
            optimizer_state_from_names(loaded.optimizer_state, optimizer, net.named_parameters())
        )
    engine.load_state_dict({**meta["engine"], "masks": loaded.masks})
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler") is not None:
        scaler.load_state_dict(meta["scaler"])
    return dict(meta.get("state", {}))


__all__ = ["prepare_engine", "report", "restore"]
