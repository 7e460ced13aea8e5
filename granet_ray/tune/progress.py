"""Live progress of a sweep on the driver: a rich bar over trials whose status line follows
the latest epoch report, and one printed line per trial that ends (finished, stopped early
by ASHA, failed). A Ray Tune callback, registered for one ``sweep`` call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.experiment import Trial
from rich.console import Console
from rich.markup import escape

from granet_ray.events import RANK_METRIC, TIME_METRIC
from granet_ray.ui.progress import LiveBar


def _epochs(trial: Trial) -> int:
    return int(trial.config["trial"]["train"]["epochs"])


def _name(trial: Trial) -> str:
    return str(trial.config["trial"]["name"])


def trial_summary(result: dict[str, Any], epochs: int) -> str:
    """``epoch e/E val acc a density d`` of a trial's latest epoch report; a mid-epoch
    checkpoint report (``--checkpoint-every-steps``) gives its step."""
    if TIME_METRIC not in result:
        return "no report"
    if RANK_METRIC not in result:
        return f"epoch {result[TIME_METRIC]}/{epochs}, checkpoint at step {result['step']}"
    return (
        f"epoch {result[TIME_METRIC]}/{epochs} val acc {result[RANK_METRIC]:.2%} "
        f"density {result['density']:.4f}"
    )


def error_line(trial: Trial) -> str:
    """The last line of a failed trial's error (the exception), and where the rest is."""
    path = trial.error_file
    if path is None or not Path(path).is_file():
        return "no error recorded"
    lines = Path(path).read_text().strip().splitlines()
    return f"{lines[-1]} (details: {path})"


class SweepDisplay(tune.Callback, LiveBar):
    """A context manager and Tune callback drawing the sweep on ``console``: a bar over
    ``total`` trials of which ``done`` ended before (a resumed sweep). Draws nothing unless
    ``enabled``."""

    def __init__(self, console: Console, *, total: int, done: int, enabled: bool = True) -> None:
        LiveBar.__init__(
            self,
            console,
            "trials",
            total=total,
            completed=done,
            status="starting trials",
            enabled=enabled,
        )
        self.done = done

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self.update(status=f"{_name(trial)} started")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any
    ) -> None:
        self.update(status=f"{_name(trial)}: {trial_summary(result, _epochs(trial))}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self.done += 1
        self.update(completed=self.done)
        result = trial.last_result or {}
        epochs = _epochs(trial)
        done = result.get(TIME_METRIC) == epochs
        ended = "finished" if done else "[yellow]stopped early (ASHA)[/]"
        self.print(f"{escape(_name(trial))} {ended}: {trial_summary(result, epochs)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self.done += 1
        self.update(completed=self.done)
        self.print(f"[red]{escape(_name(trial))} failed[/]: {escape(error_line(trial))}")
