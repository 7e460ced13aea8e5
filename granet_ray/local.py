"""A run in this process, without Ray: the same recipe, checkpoints and outcome as a Ray Train
run, on one device (``granet-ray train``; the GPU check). With an initialized
``torch.distributed`` group of one process (e.g. NCCL on one GPU) the model is wrapped in
DDP and the engine uses the ``DistributedSync``, as a Ray worker would."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from rich.console import Console
from torch import nn

from granet_ray.checks import check_data, check_request, check_storage
from granet_ray.config import RunSettings, TrainConfig
from granet_ray.data import StreamOptions
from granet_ray.distributed import DistributedSync, is_initialized
from granet_ray.outcome import FitOutcome
from granet_ray.recipe import Hooks, build_run
from granet_ray.session import FolderCheckpoints, conclude, named, train_session
from granet_ray.store.lease import RunLease
from granet_ray.ui import console as default_console
from granet_ray.ui.progress import RunView


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


def fit_local(
    train: TrainConfig,
    settings: RunSettings,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    summary: bool = True,
    console: Console | None = None,
    hooks: Sequence[Hooks] = (),
    loader_workers: int | None = None,
) -> FitOutcome:
    """Train ``train`` in this process, writing checkpoints into ``settings``' run folder
    (resuming from the newest one there), and return the outcome.

    Args:
        train: the recipe.
        settings: where the run's folder is (``num_workers`` is ignored: one process).
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: CUDA if available).
        progress: show the live display on ``console``.
        summary: print the final per-layer and outcome tables on ``console``.
        console: where to print (default: stdout, wide when it is a pipe).
        hooks: extra ``recipe.Hooks`` (e.g. fault injection in tests).
        loader_workers: data-loader processes (None: ``default_loader_workers``).

    Returns:
        The ``FitOutcome`` of the newest checkpoint of the run.

    Raises:
        ConfigError: a value that cannot work, naming the field (before training).
        StorageError: the storage cannot be reached or written (before training).
        LeaseHeldError: another live run holds the run's folder (before training).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_request(train, 1, device.type == "cuda")
    check_data(train, settings)
    check_storage(settings)
    settings = named(settings, train)
    console = console or default_console()
    distributed = is_initialized()
    with RunLease(settings.run_uri, settings.storage_options, renew_s=settings.lease_renew_s):
        run = build_run(
            train,
            device=device,
            wrap=(lambda model: wrap_ddp(model, device)) if distributed else None,
            sync=DistributedSync() if distributed else None,
            loader_workers=default_loader_workers(device)
            if loader_workers is None
            else loader_workers,
            stream=StreamOptions.of(settings),
        )
        with RunView(console, enabled=progress) as view:
            train_session(
                run, settings, checkpoints=FolderCheckpoints(settings), send=view.show, hooks=hooks
            )
        return conclude(train, settings, console=console, summary=summary)
