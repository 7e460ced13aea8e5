"""The Ray Train worker: one process of a data-parallel GraNet run.

Every worker builds the same run with the recipe (the model in DDP through
``ray.train.torch.prepare_model``, its share of every global step, the engine with a
``DistributedSync``), resumes from the newest committed checkpoint of the run's folder if
there is one (on any number of workers), and trains with hooks that report every epoch to
Ray Train with its checkpoint (written by rank 0 in the store's format) and send rank 0's
progress events to the driver. The session itself (resume or start, hooks) is
``granet_ray.session``'s, the same as a run in one process.
"""

from __future__ import annotations

from typing import Any

import ray.train
import ray.train.torch
from ray.exceptions import RayError
from ray.util.queue import Queue

from granet_ray.config import RunSettings, TrainConfig
from granet_ray.data import StreamOptions
from granet_ray.distributed import DistributedSync, gather_objects
from granet_ray.events import CHECKPOINT_REPORT, EpochMetrics, Event
from granet_ray.recipe import Hooks, Position, Run, build_run
from granet_ray.resume import checkpoint_name, rng_state, save_checkpoint
from granet_ray.retention import apply_retention
from granet_ray.session import train_session
from granet_ray.train.loop import report_checkpoint


class ReportHooks(Hooks):
    """Reports every epoch's metrics to Ray Train, with the checkpoint when one is due, and
    mid-epoch checkpoints (their report carries ``epoch``, ``step`` and ``step_in_epoch``).
    Every worker reports; rank 0 writes the checkpoint into a temporary folder that Ray
    copies into the run's folder, then deletes the old checkpoints ``settings`` does not keep
    (``retention``: never the newest committed one, which a restarted worker group resumes
    from)."""

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings

    def on_checkpoint(self, run: Run, position: Position) -> None:
        values = (position.epoch, run.engine.step_count, position.step_in_epoch)
        self._report(run, dict(zip(CHECKPOINT_REPORT, values, strict=True)), position)

    def on_epoch(
        self, run: Run, metrics: EpochMetrics, position: Position, checkpoint: bool
    ) -> None:
        if checkpoint:
            self._report(run, dict(metrics), position)
        else:
            ray.train.report(dict(metrics))

    def _report(self, run: Run, metrics: dict[str, Any], position: Position) -> None:
        rngs = gather_objects(rng_state())  # every worker's, for an exact resume
        name = checkpoint_name(position, run.plan.steps_per_epoch)
        report_checkpoint(metrics, name, lambda path: save_checkpoint(run, position, path, rngs))
        if run.rank == 0:
            apply_retention(self.settings, position.epochs)


class QueueSender:
    """Rank 0's progress events onto the driver's queue. Progress is a display, never a
    reason to fail a run: when the queue cannot be reached (its actor gone, the driver
    lost) the sender says so once and drops the rest."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.lost = False

    def __call__(self, event: Event) -> None:
        if self.lost:
            return
        try:
            self.queue.put_nowait(event)
        except RayError as err:
            self.lost = True
            print(f"granet-ray: progress events are no longer sent to the driver: {err}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function. ``config``: ``{"train": TrainConfig.to_dict(),
    "run": RunSettings.to_dict()}``, optionally ``"progress"`` (a ``ray.util.queue.Queue``
    rank 0 sends its events to) and ``"hooks"`` (extra ``recipe.Hooks`` objects, e.g. the
    fault injection of ``granet_ray.testing``)."""
    train = TrainConfig.from_dict(config["train"])
    settings = RunSettings.from_dict(config["run"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    run = build_run(
        train,
        device=ray.train.torch.get_device(),
        rank=rank,
        world=world,
        wrap=ray.train.torch.prepare_model,
        sync=DistributedSync() if world > 1 else None,
        loader_workers=max(int(settings.cpus_per_worker) - 1, 0),
        stream=StreamOptions.of(settings),
    )
    # Resumes from the newest committed checkpoint of the run's folder: the one Ray hands
    # out, or a newer one Ray had not registered yet when a worker died.
    queue = config.get("progress")
    train_session(
        run,
        settings,
        checkpoints=ReportHooks(settings),
        send=QueueSender(queue) if queue is not None and rank == 0 else None,
        hooks=config.get("hooks", []),
    )
