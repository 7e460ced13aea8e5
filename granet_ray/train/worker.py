"""The Ray Train worker loop: one process of a data-parallel GraNet run.

Every worker builds the same model, wraps it in DDP (``ray.train.torch.prepare_model``),
reads its shard of the data through a ``DistributedSampler``, and runs the GraNet engine
with a ``DistributedSync`` so all workers decide every mask update on the same averaged
scores and verify they agree. Rank 0 writes the checkpoints (the store's Arrow CSR format
plus everything needed to resume exactly) and sends live progress to the driver.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from granet_ray.config import TrainConfig
from granet_ray.data import build_datasets
from granet_ray.distributed import DistributedSync, gather_objects, sum_across_workers
from granet_ray.loop import (
    EvalResult,
    StepInfo,
    build_lr_schedule,
    build_optimizer,
    evaluate,
    seed_everything,
    train_epoch,
)
from granet_ray.models import build_model
from granet_ray.sparsity import GraNet, unwrap
from granet_ray.store import (
    latest_checkpoint,
    load_sparse,
    optimizer_state_by_name,
    optimizer_state_from_names,
    save_sparse,
)
from granet_ray.train.progress import ProgressSender
from granet_ray.train.settings import RunSettings, run_uri
from granet_ray.train.state import (
    check_resumable,
    checkpoint_metadata,
    rng_state,
    set_rng_state,
    worker_seed,
)


@dataclass(frozen=True)
class CrashAt:
    """Fault injection for tests and demonstrations of crash-resume: worker ``rank`` ends its
    process abruptly (``os._exit(1)``, a real crash for Ray) right after optimizer step
    ``step``, once: it creates the file ``marker`` first and never fires while it exists.
    ``marker`` must be on a disk that worker sees."""

    step: int
    marker: str
    rank: int = 0


def checkpoint_dir_name(epoch: int) -> str:
    """The folder of the checkpoint written after ``epoch`` completed epochs."""
    return f"checkpoint_epoch_{epoch:04d}"


def _loaders(
    train: TrainConfig, run: RunSettings, rank: int, world: int, device: torch.device
) -> tuple[DataLoader, DistributedSampler, DataLoader, int]:
    """Training loader over this worker's shard (shuffled by seed and epoch), evaluation
    loader over test samples rank, rank + world, ... (each sample on exactly one worker),
    and the number of classes."""
    data = build_datasets(
        train.dataset, train.data_root, train_size=train.train_size, seed=train.seed
    )
    sampler = DistributedSampler(
        data.train, num_replicas=world, rank=rank, shuffle=True, seed=train.seed
    )
    options: dict[str, Any] = {
        "num_workers": max(int(run.cpus_per_worker) - 1, 0),
        "pin_memory": device.type == "cuda",
    }
    train_loader = DataLoader(data.train, batch_size=train.batch_size, sampler=sampler, **options)
    shard: Dataset = Subset(data.test, range(rank, len(data.test), world))  # type: ignore[arg-type]
    test_loader = DataLoader(shard, batch_size=train.batch_size, **options)
    return train_loader, sampler, test_loader, data.num_classes


def _epoch_metrics(
    epoch: int, engine: GraNet, fit: EvalResult, val: EvalResult, seconds: float
) -> dict[str, Any]:
    """What every ``ray.train.report`` carries; ``fit`` and ``val`` are summed over workers."""
    next_update = engine.next_update_step()
    return {
        "epoch": epoch,
        "step": engine.step_count,
        "train_loss": fit.loss,
        "train_accuracy": fit.accuracy,
        "val_loss": val.loss,
        "val_accuracy": val.accuracy,
        "accuracy": val.accuracy,
        "density": engine.density(),
        "inference_flops": engine.inference_flops(),
        "training_flops": engine.training_flops(),
        "next_update": -1 if next_update is None else next_update,
        "mask_updates": len(engine.history),
        "samples_per_second": fit.count / seconds,
    }


def _sum_results(fit: EvalResult, val: EvalResult) -> tuple[EvalResult, EvalResult]:
    """Training and evaluation sums added over all workers (one all-reduce)."""
    sums = sum_across_workers(
        [fit.loss_sum, fit.correct, fit.count, val.loss_sum, val.correct, val.count]
    )
    return (
        EvalResult(sums[0], round(sums[1]), round(sums[2])),
        EvalResult(sums[3], round(sums[4]), round(sums[5])),
    )


@dataclass
class _Training:
    """What one worker trains with."""

    model: nn.Module  # DDP-wrapped when there are several workers
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: GraNet
    scaler: torch.amp.GradScaler | None


def _restore(
    t: _Training, uri: str, train: TrainConfig, run: RunSettings, rank: int, world: int
) -> tuple[int, list[dict[str, Any]]]:
    """Load the checkpoint at ``uri`` into ``t`` and this worker's RNGs; returns the
    completed epochs and the per-epoch metrics so far."""
    model = unwrap(t.model)
    device = next(model.parameters()).device
    loaded = load_sparse(uri, model=model, map_location=device, storage_options=run.storage_options)
    meta = loaded.metadata
    check_resumable(meta, train, world)
    t.optimizer.load_state_dict(
        optimizer_state_from_names(loaded.optimizer_state, t.optimizer, model.named_parameters())
    )
    t.scheduler.load_state_dict(meta["scheduler"])
    t.engine.load_state_dict({**meta["engine"], "masks": loaded.masks})
    if t.scaler is not None and meta["scaler"]:
        t.scaler.load_state_dict(meta["scaler"])
    set_rng_state(meta["rng"][rank])
    return meta["epoch"], meta["epochs"]


def _report_checkpoint(
    t: _Training,
    train: TrainConfig,
    epoch: int,
    metrics: dict[str, Any],
    epochs: list[dict[str, Any]],
    rank: int,
    world: int,
) -> None:
    """Report ``metrics`` with a checkpoint: every worker's RNG states are gathered, rank 0
    writes the store's format to a temporary folder and Ray copies it to the run folder."""
    rngs = gather_objects(rng_state())
    name = checkpoint_dir_name(epoch)
    if rank != 0:
        ray.train.report(metrics, checkpoint_dir_name=name)
        return
    model = unwrap(t.model)
    metadata = checkpoint_metadata(
        train=train,
        epoch=epoch,
        world_size=world,
        engine_state=t.engine.state_dict(),
        summary=t.engine.summary(),
        epochs=epochs,
        scheduler=t.scheduler.state_dict(),
        scaler=None if t.scaler is None else t.scaler.state_dict(),
        rng=rngs,
    )
    with tempfile.TemporaryDirectory(prefix="granet-ckpt-") as tmp:
        path = save_sparse(
            model.state_dict(),
            os.path.join(tmp, name),
            masks=t.engine.masks,
            metadata=metadata,
            optimizer_state=optimizer_state_by_name(t.optimizer, model.named_parameters()),
        )
        checkpoint = ray.train.Checkpoint.from_directory(path)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function. ``config``: ``{"train": TrainConfig.to_dict(),
    "run": RunSettings.to_dict()}``, optionally ``"progress"`` (a ``ray.util.queue.Queue``
    rank 0 sends live events to) and ``"crash"`` (a ``CrashAt`` as a dict)."""
    train = TrainConfig.from_dict(config["train"])
    run = RunSettings.from_dict(config["run"])
    crash = CrashAt(**config["crash"]) if config.get("crash") else None
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    queue = config.get("progress")
    sender = ProgressSender(queue) if queue is not None and rank == 0 else None
    device = ray.train.torch.get_device()
    amp = train.amp and device.type == "cuda"

    seed_everything(train.seed)
    train_loader, sampler, test_loader, num_classes = _loaders(train, run, rank, world, device)
    model = ray.train.torch.prepare_model(build_model(train.model, num_classes=num_classes))
    optimizer = build_optimizer(model, train)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * train.epochs
    t = _Training(
        model=model,
        optimizer=optimizer,
        scheduler=build_lr_schedule(optimizer, train, steps_per_epoch),
        engine=GraNet(
            model,
            optimizer,
            train.granet,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            sync=DistributedSync() if world > 1 else None,
        ),
        scaler=torch.amp.GradScaler("cuda") if amp else None,
    )
    seed_everything(worker_seed(train.seed, rank))  # the same weights, different augmentation
    # Resume from the newest committed checkpoint in the run folder: the one Ray hands out
    # (ray.train.get_checkpoint()) or a newer one that Ray had not registered yet when a
    # worker died (Ray collects reports at its health checks, every 2 s).
    resume = latest_checkpoint(run_uri(run), storage_options=run.storage_options)
    start_epoch, epochs = (
        (0, []) if resume is None else _restore(t, resume, train, run, rank, world)
    )
    engine = t.engine
    if sender is not None:
        sender.send(
            {
                "kind": "start",
                "epoch": start_epoch,
                "epochs": train.epochs,
                "step": engine.step_count,
                "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps,
                "world_size": world,
            }
        )

    for epoch in range(start_epoch + 1, train.epochs + 1):
        sampler.set_epoch(epoch - 1)

        def on_step(info: StepInfo, epoch: int = epoch) -> None:
            if crash is not None and rank == crash.rank and info.step == crash.step:
                _crash_once(crash.marker)
            last = info.step % steps_per_epoch == 0
            if sender is not None and sender.due(force=info.update is not None or last):
                sender.send(
                    {
                        "kind": "step",
                        "epoch": epoch,
                        "step": info.step,
                        "loss": info.loss,
                        "density": engine.density(),
                        "next_update": engine.next_update_step(),
                    }
                )

        start = time.perf_counter()
        fit = train_epoch(
            model,
            train_loader,
            optimizer,
            t.scheduler,
            engine,
            device=device,
            label_smoothing=train.label_smoothing,
            scaler=t.scaler,
            on_step=on_step,
        )
        seconds = time.perf_counter() - start
        val = evaluate(model, test_loader, device=device, amp=amp)
        metrics = _epoch_metrics(epoch, engine, *_sum_results(fit, val), seconds)
        epochs.append(metrics)
        if sender is not None:
            sender.send({"kind": "epoch", **metrics})
        if epoch % run.checkpoint_every == 0 or epoch == train.epochs:
            _report_checkpoint(t, train, epoch, metrics, epochs, rank, world)
        else:
            ray.train.report(metrics)


def _crash_once(marker: str) -> None:
    """End this process like a crash, unless ``marker`` exists (then it already happened)."""
    path = Path(marker)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    os._exit(1)
