"""ASHA within each sparsity level, without Ray running: a trial is compared only with the
trials that aim at the same final density."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from granet_ray.tune.asha import LevelASHA
from granet_ray.tune.space import Asha


@dataclass
class FakeTrial:
    """What the schedulers read of a Tune trial: its id and config."""

    trial_id: str
    final_density: float
    config: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.config = {"trial": {"train": {"granet": {"final_density": self.final_density}}}}


def _first_epoch(scheduler: Any, trials: list[FakeTrial], accuracy: list[float]) -> list[str]:
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    return [
        scheduler.on_trial_result(None, t, {"epoch": 1, "val_accuracy": a})
        for t, a in zip(trials, accuracy, strict=True)
    ]


def test_trials_are_compared_within_their_level_only() -> None:
    trials = [FakeTrial("a", 0.1), FakeTrial("b", 0.02), FakeTrial("c", 0.1), FakeTrial("d", 0.02)]
    accuracy = [0.95, 0.60, 0.90, 0.70]
    level = LevelASHA(Asha(grace_period=1, reduction_factor=2), max_t=3)
    assert level.set_search_properties(None, None) and level.metric == "val_accuracy"
    decisions = _first_epoch(level, trials, accuracy)
    # c trails a (same level) and stops; b and d are the 98% level's only two: b came
    # first, d beats it. One ASHA over all trials stops both 98% trials instead.
    assert decisions == ["CONTINUE", "CONTINUE", "STOP", "CONTINUE"]
    assert decisions[2] == TrialScheduler.STOP
    one = ASHAScheduler(time_attr="epoch", metric="val_accuracy", mode="max", max_t=3)
    assert _first_epoch(one, trials, accuracy) == ["CONTINUE", "STOP", "CONTINUE", "STOP"]
    assert "d_f=0.1" in level.debug_string() and "d_f=0.02" in level.debug_string()


def test_trials_finish_at_the_last_epoch_by_themselves() -> None:
    level = LevelASHA(Asha(), max_t=3)
    trial = FakeTrial("a", 0.1)
    level.on_trial_add(None, trial)
    for epoch in (1, 2, 3):
        assert level.on_trial_result(None, trial, {"epoch": epoch, "val_accuracy": 0.5}) == (
            TrialScheduler.CONTINUE
        )
    level.on_trial_complete(None, trial, {"epoch": 3, "val_accuracy": 0.5})
