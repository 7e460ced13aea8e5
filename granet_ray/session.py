"""One run's session, the same wherever it runs (this process, a Ray Train worker, a Tune
trial): resume from the newest committed checkpoint of the run's folder or start afresh, train
with the hooks every runner shares (progress events, checkpoints, extra hooks), and, on the
side that launched it, the outcome with its final tables. No Ray: a runner hands in how its
checkpoints are written (``FolderCheckpoints`` here, a Ray Train report on workers) and
where its progress events go.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence

from rich.console import Console

from granet_ray.config import RunSettings, TrainConfig, run_name
from granet_ray.events import EpochMetrics, Event, Resized
from granet_ray.outcome import FitOutcome, finish
from granet_ray.recipe import (
    HookChain,
    Hooks,
    Position,
    ProgressHooks,
    Run,
    run_epochs,
    start_event,
)
from granet_ray.resume import (
    Resumed,
    checkpoint_name,
    resume_latest,
    rng_state,
    save_checkpoint,
)
from granet_ray.retention import apply_retention
from granet_ray.store import CheckpointError, latest_checkpoint
from granet_ray.store.gc import RESUME_MIN_AGE_S, collect_orphans
from granet_ray.ui.tables import layer_table, outcome_table
from granet_ray.watch import watch_hooks


class FolderCheckpoints(Hooks):
    """Writes the due checkpoints of a run in this process into its folder, then deletes
    the old ones ``settings`` does not keep (``retention``)."""

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings

    def save(self, run: Run, position: Position) -> None:
        uri = f"{self.settings.run_uri}/{checkpoint_name(position, run.plan.steps_per_epoch)}"
        save_checkpoint(run, position, uri, [rng_state()], self.settings.storage_options)
        apply_retention(self.settings, position.epochs)

    def on_checkpoint(self, run: Run, position: Position) -> None:
        self.save(run, position)

    def on_epoch(
        self, run: Run, metrics: EpochMetrics, position: Position, checkpoint: bool
    ) -> None:
        if checkpoint:
            self.save(run, position)


def record_resize(run: Run, resumed: Resumed, now: float) -> Resized | None:
    """The resize of a run restarted on another number of workers than the one that wrote
    ``resumed`` (None for the same number), also appended to ``run.resizes``: step, old and
    new size, the checkpoint, and the seconds lost since it was saved."""
    old = resumed.metadata["world_size"]
    if old == run.world:
        return None
    resize = Resized(
        step=run.engine.step_count,
        old_size=old,
        new_size=run.world,
        checkpoint=resumed.checkpoint,
        seconds_lost=max(0.0, now - resumed.saved_at),
    )
    run.resizes.append(resize.record())
    return resize


def train_session(
    run: Run,
    settings: RunSettings,
    *,
    checkpoints: Hooks,
    send: Callable[[Event], None] | None = None,
    hooks: Sequence[Hooks] = (),
) -> Position:
    """Train ``run`` to its last epoch in ``settings``' run folder: resumed from the newest
    committed checkpoint there that verifies (written on any number of workers; a damaged
    one is set aside with a warning), else from the start.

    checkpoints: writes the due checkpoints (every ``settings.checkpoint_every`` epochs, the
    last epoch, and every ``checkpoint_every_steps`` global steps). send: where this
    process's progress events go (None: nowhere, e.g. on workers other than rank 0).
    hooks: extra hooks, called after those. Returns the final position.

    Rank 0 (the process that writes checkpoints) also removes the orphaned data files of a
    resumed run's folder (``store.gc``) and writes TensorBoard / MLflow (``watch``).
    """
    resumed = resume_latest(run, settings.run_uri, settings.storage_options)
    uri = None if resumed is None else resumed.checkpoint
    resize = None if resumed is None else record_resize(run, resumed, time.time())
    position = Position() if resumed is None else resumed.position
    if resumed is not None and run.rank == 0:
        clean_orphans(settings)
    chain: list[Hooks] = [checkpoints, *hooks]
    if send is not None:
        chain.insert(0, ProgressHooks(send))
        send(start_event(run, position, uri))
        if resize is not None:
            send(resize)
    watch = watch_hooks(run, settings, run.engine.step_count) if run.rank == 0 else None
    if watch is not None:
        chain.append(watch)
        if resize is not None:
            watch.resized(resize.record())
    final = None
    try:
        end = run_epochs(
            run,
            HookChain(chain),
            start=position,
            checkpoint_every=settings.checkpoint_every,
            checkpoint_every_steps=settings.checkpoint_every_steps,
        )
        if watch is not None:
            final = latest_checkpoint(settings.run_uri, storage_options=settings.storage_options)
        return end
    finally:
        if watch is not None:
            watch.close(final)


def clean_orphans(settings: RunSettings) -> None:
    """Delete the orphaned checkpoint data files of ``settings``' run folder older than
    ``RESUME_MIN_AGE_S`` (a save killed before it committed); a failure is a warning."""
    try:
        collect_orphans(settings.run_uri, settings.storage_options, min_age_s=RESUME_MIN_AGE_S)
    except CheckpointError as exc:
        warnings.warn(f"orphaned checkpoint files were not removed: {exc}", stacklevel=2)


def conclude(
    train: TrainConfig, settings: RunSettings, *, console: Console, summary: bool = True
) -> FitOutcome:
    """The outcome of a finished run, from the newest committed checkpoint of its folder
    (whatever Ray's own bookkeeping registered last), with ``history.json`` and the plot
    written beside it; with ``summary``, the per-layer and outcome tables on ``console``."""
    uri = latest_checkpoint(settings.run_uri, storage_options=settings.storage_options)
    if uri is None:
        raise RuntimeError(f"run {settings.name} finished without a checkpoint")
    outcome = finish(train, settings, uri)
    if summary:
        console.print(layer_table(outcome.summary, title=f"{train.model}: final sparse model"))
        console.print(outcome_table(outcome))
    return outcome


def named(settings: RunSettings, train: TrainConfig) -> RunSettings:
    """``settings`` with a run name: its own, else a new unique one."""
    return settings.replace(name=settings.name or run_name(train))
