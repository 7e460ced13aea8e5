"""What a run tells those who watch it, typed and named in one place: the metrics every epoch
reports (to Ray Train, Tune, ``history.json`` and the display), the progress events a run
sends while it trains, and the outcome of a finished run. Plain data, no Ray, no torch: the
events are pickled onto Ray's queue from worker rank 0 to the driver, the metrics are
reported as plain dicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict


class EpochMetrics(TypedDict):
    """What every epoch reports. ``epoch`` counts completed epochs (1-based); losses and
    accuracies are over all workers; ``next_update`` is -1 once the masks are final."""

    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    accuracy: float
    density: float
    inference_flops: float
    training_flops: float
    next_update: int
    mask_updates: int
    samples_per_second: float
    world_size: int


# The metric sweeps and early stopping rank trials by (higher is better), and the report
# field that counts time for them.
RANK_METRIC = "val_accuracy"
TIME_METRIC = "epoch"
# A mid-epoch checkpoint's report: these fields only (no validation yet).
CHECKPOINT_REPORT = ("epoch", "step", "step_in_epoch")


@dataclass(frozen=True)
class Started:
    """The run starts, or resumes from ``checkpoint`` at ``epoch`` / ``step``."""

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    total_steps: int
    global_batch: int
    world_size: int
    checkpoint: str | None


@dataclass(frozen=True)
class Stepped:
    """A global step done (sent at most a few times a second, and at every mask update)."""

    epoch: int
    step: int
    loss: float
    density: float
    next_update: int | None


@dataclass(frozen=True)
class EpochEnded:
    """An epoch done and evaluated."""

    metrics: EpochMetrics


@dataclass(frozen=True)
class Resized:
    """An elastic run restarted on ``new_size`` workers from ``checkpoint`` at ``step``;
    ``seconds_lost``: from that checkpoint's save to the restart (work done again)."""

    step: int
    old_size: int
    new_size: int
    checkpoint: str
    seconds_lost: float

    def record(self) -> dict[str, Any]:
        """The resize as a plain dict (checkpoints and ``history.json`` keep these)."""
        return {
            "step": self.step,
            "old_size": self.old_size,
            "new_size": self.new_size,
            "checkpoint": self.checkpoint,
            "seconds_lost": self.seconds_lost,
        }


Event = Started | Stepped | EpochEnded | Resized


@dataclass(frozen=True)
class FitOutcome:
    """What a finished run produced.

    metrics: the last epoch's report (accuracy, density, FLOPs, ...). checkpoint_uri: the
    final checkpoint (open it with ``granet_ray.load_sparse``); checkpoint_bytes: its size.
    summary: ``GraNet.summary()`` at the end (per-layer rows, relative FLOPs). history:
    per-mask-update statistics; epochs: per-epoch metrics; resizes: the elastic restarts.
    run_uri: the run's folder, which also holds ``history.json`` and ``training.png``.
    """

    name: str
    metrics: dict[str, Any]
    checkpoint_uri: str
    checkpoint_bytes: int
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    resizes: list[dict[str, Any]]
    run_uri: str
    plot_uri: str
