"""ASHA early stopping within each sparsity level.

A sweep asks which schedule is best *for a given sparsity*; at the same epoch a 98%-sparse
trial trails a 90%-sparse one whatever its schedule, so one ASHA over all trials would stop
the sparsest levels first and leave them without a finished trial. ``LevelASHA`` runs one
``ASHAScheduler`` per target final density instead.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from granet_ray.events import RANK_METRIC as METRIC
from granet_ray.events import TIME_METRIC as TIME_ATTR
from granet_ray.tune.space import Asha


def trial_level(trial: Trial) -> float:
    """The trial's target final density (its level)."""
    return float(trial.config["trial"]["train"]["granet"]["final_density"])


class LevelASHA(FIFOScheduler):
    """``ASHAScheduler`` on validation accuracy (max) over epochs, one per target final
    density: a trial is compared only with the trials of its level that reached the same
    epoch before it. Trials run to ``max_t`` epochs by themselves (never stopped there)."""

    def __init__(self, asha: Asha, max_t: int) -> None:
        super().__init__()
        self.asha = asha
        self.max_t = max_t
        self._metric = METRIC
        self._levels: dict[float, ASHAScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return metric in (None, METRIC) and mode in (None, "max")

    def level(self, trial: Trial) -> ASHAScheduler:
        """The ASHA of the trial's level (created when first needed)."""
        density = trial_level(trial)
        if density not in self._levels:
            self._levels[density] = ASHAScheduler(
                time_attr=TIME_ATTR,
                metric=METRIC,
                mode="max",
                max_t=self.max_t,
                grace_period=self.asha.grace_period,
                reduction_factor=self.asha.reduction_factor,
                stop_last_trials=False,
            )
        return self._levels[density]

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self.level(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        return self.level(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self.level(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.level(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"d_f={d:g}: {s.debug_string()}" for d, s in self._levels.items())
