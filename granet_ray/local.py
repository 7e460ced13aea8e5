"""A run in this process, without Ray: the same recipe, checkpoints and outcome as a Ray Train
run, on one device (``granet-ray train``; the GPU check). With an initialized
``torch.distributed`` group of one process (e.g. NCCL on one GPU) the model is wrapped in
DDP and the engine uses the ``DistributedSync``, as a Ray worker would."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from torch import nn

from granet_ray.checks import check_storage, preflight
from granet_ray.config import RunSettings, TrainConfig, run_name
from granet_ray.distributed import DistributedSync, is_initialized
from granet_ray.outcome import FitOutcome, finish
from granet_ray.recipe import (
    HookChain,
    Hooks,
    Position,
    ProgressHooks,
    Run,
    build_run,
    run_epochs,
    start_event,
)
from granet_ray.resume import checkpoint_name, restore, rng_state, save_checkpoint
from granet_ray.store import latest_checkpoint
from granet_ray.ui import console as default_console
from granet_ray.ui.progress import RunView
from granet_ray.ui.tables import layer_table, outcome_table


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel over the initialized process group."""
    ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def default_loader_workers(device: torch.device) -> int:
    """Data-loader processes of a run in this process: none on the CPU (its cores train), up
    to 4 on CUDA, leaving one CPU core to the training loop."""
    if device.type != "cuda":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


class CheckpointHooks(Hooks):
    """Writes the due checkpoints of a run in this process into its folder."""

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.last: str | None = None

    def save(self, run: Run, position: Position) -> None:
        uri = f"{self.settings.run_uri}/{checkpoint_name(position, run.plan.steps_per_epoch)}"
        options = self.settings.storage_options
        self.last = save_checkpoint(run, position, uri, [rng_state()], options)

    def on_checkpoint(self, run: Run, position: Position) -> None:
        self.save(run, position)

    def on_epoch(
        self, run: Run, metrics: dict[str, Any], position: Position, checkpoint: bool
    ) -> None:
        if checkpoint:
            self.save(run, position)


def fit_local(
    train: TrainConfig,
    settings: RunSettings,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    console: Console | None = None,
    hooks: Sequence[Hooks] = (),
    loader_workers: int | None = None,
) -> FitOutcome:
    """Train ``train`` in this process on ``device`` (default: CUDA if available), writing
    checkpoints into ``settings``' run folder (resuming from the newest one there), and
    return the outcome. ``settings.num_workers`` is ignored; ``hooks`` are extra hooks;
    ``loader_workers``: data-loader processes (None: ``default_loader_workers``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preflight(train, 1, device.type == "cuda")
    check_storage(settings)
    settings = settings.replace(name=settings.name or run_name(train))
    console = console or default_console()
    distributed = is_initialized()
    run = build_run(
        train,
        device=device,
        wrap=(lambda model: wrap_ddp(model, device)) if distributed else None,
        sync=DistributedSync() if distributed else None,
        loader_workers=default_loader_workers(device) if loader_workers is None else loader_workers,
    )
    resume = latest_checkpoint(settings.run_uri, storage_options=settings.storage_options)
    position = Position()
    if resume is not None:
        position = restore(run, resume, settings.storage_options).position
    checkpoints = CheckpointHooks(settings)
    with RunView(console, enabled=progress) as view:
        view.show(start_event(run, position, resume))
        chain = HookChain([ProgressHooks(view.show), checkpoints, *hooks])
        run_epochs(
            run,
            chain,
            start=position,
            checkpoint_every=settings.checkpoint_every,
            checkpoint_every_steps=settings.checkpoint_every_steps,
        )
    outcome = finish(train, settings, checkpoints.last or resume or "")
    if progress:
        console.print(layer_table(outcome.summary, title=f"{train.model}: final sparse model"))
        console.print(outcome_table(outcome))
    return outcome
