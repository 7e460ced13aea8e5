"""A real sweep on Ray Tune + Train (the packaged ``smoke`` grid: 4 trials of 3 short epochs,
1 CPU worker each, one at a time so that ASHA's comparisons are deterministic): interrupted
like Ctrl+C once two trials have ended, then resumed by running the same job command again,
which runs only the two trials left, where ASHA stops the hopeless one early, and writes the
table, the plot and the presets; every trial's checkpoints open with ``load_sparse``."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ray import tune
from ray.tune.experiment import Trial
from rich.console import Console

from granet_ray.checks import preflight
from granet_ray.cli import build_parser, grid_overrides, run_settings
from granet_ray.config import load_preset_file
from granet_ray.store import load_sparse
from granet_ray.tune import sweep
from granet_ray.tune.driver import RESULTS_DIR, RUNS_DIR, SweepOutcome
from granet_ray.tune.space import load_space

ROOT = Path(__file__).resolve().parents[1]


class InterruptOnce(tune.Callback):
    """Sends this process SIGINT (what Ctrl+C does) once two trials have ended; Tune then
    saves the sweep and returns."""

    def __init__(self) -> None:
        self.ended = 0

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        self.ended += 1
        if self.ended == 2:
            signal.raise_signal(signal.SIGINT)


@dataclass
class Sweep:
    first: SweepOutcome
    first_shown: str
    ended_first: dict[str, dict[str, Any]]  # trial -> files it had when the first call ended
    exit_code: int
    second_shown: str
    folder: Path
    rows: list[dict[str, str]]


def _files(folder: Path, trial: str) -> dict[str, Any]:
    """A trial's Tune results and every file of its Train run, with modification times."""
    run = folder / RUNS_DIR / trial
    return {
        "result.json": (folder / trial / "result.json").read_bytes(),
        "run": sorted((str(p.relative_to(run)), p.stat().st_mtime_ns) for p in run.rglob("*")),
    }


@pytest.fixture(scope="module")
def swept(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """The first call interrupted, then the job run again with the same flags."""
    storage = tmp_path_factory.mktemp("sweeps")
    argv = ["--grid", "smoke", "--storage", str(storage), "--max-concurrent", "1"]
    args = build_parser().parse_args(["sweep", *argv])
    out = io.StringIO()
    interrupt = InterruptOnce()
    first = sweep(
        load_space(args.grid, grid_overrides(args)),
        run_settings(args, sweep=True),
        max_concurrent=args.max_concurrent,
        console=Console(file=out, width=200),
        callbacks=[interrupt],
    )
    folder = Path(first.uri)
    ended = {r.name: _files(folder, r.name) for r in first.rows if r.status != "unfinished"}

    # Running the same command again resumes the sweep.
    spec = importlib.util.spec_from_file_location("job_sweep", ROOT / "jobs" / "tune_schedules.py")
    assert spec is not None and spec.loader is not None
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    shown = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(shown):
        patch.setenv("COLUMNS", "200")
        exit_code = job.main(argv)
    with open(folder / RESULTS_DIR / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return Sweep(first, out.getvalue(), ended, exit_code, shown.getvalue(), folder, rows)


def test_an_interrupted_sweep_reports_what_is_left(swept: Sweep) -> None:
    first = swept.first
    statuses = [r.status for r in first.rows]
    assert not first.complete and not first.resumed
    assert statuses[:2] in (["finished", "finished"], ["finished", "stopped"])
    assert statuses[2:] == ["unfinished", "unfinished"]
    assert first.presets == {} and first.plot_uri is None and first.analysis is None
    assert "granet-d2s_df0.1_dt4_w0-1.5_s0 finished" in swept.first_shown
    assert "interrupted with 2 trial(s) left" in swept.first_shown
    assert "run the same command again" in swept.first_shown


def test_running_the_same_command_again_runs_only_the_trials_left(swept: Sweep) -> None:
    assert swept.exit_code == 0
    done_before = len(swept.ended_first)
    assert f"resuming sweep {swept.first.name}" in swept.second_shown
    assert f"4 trials, {done_before} done before, up to 1 at once" in swept.second_shown
    # The trials that had ended were not run again: their Tune results and their Train runs
    # (checkpoints, snapshot) are byte for byte and timestamp for timestamp as they were.
    for trial, files in swept.ended_first.items():
        assert _files(swept.folder, trial) == files, trial
    assert {r["name"] for r in swept.rows} == {r.name for r in swept.first.rows}
    assert {r["status"] for r in swept.rows} <= {"finished", "stopped"}


def test_asha_stops_a_trial_early_and_the_others_run_every_epoch(swept: Sweep) -> None:
    # RigL at 0.5% density trails granet at 0.5% at epoch 2, ASHA's first rung (the first
    # epoch after the pruning window), and is stopped there.
    stopped = {r["name"]: r for r in swept.rows if r["status"] == "stopped"}
    assert stopped["rigl_df0.005_dt4_w0-1.5_s0"]["epoch"] == "2"
    assert "rigl_df0.005_dt4_w0-1.5_s0 stopped early (ASHA)" in swept.second_shown
    assert all(int(r["epoch"]) < int(r["epochs"]) for r in stopped.values())
    for r in swept.rows:
        if r["status"] == "finished":
            assert r["epoch"] == r["epochs"] == "3"
            assert float(r["density"]) == pytest.approx(float(r["final_density"]), rel=1e-3)
            assert 0 < float(r["inference_flops"]) <= float(r["training_flops"]) <= 1


def test_every_trial_checkpoint_opens_with_load_sparse(swept: Sweep) -> None:
    for r in swept.rows:
        checkpoint = load_sparse(r["checkpoint"])
        assert Path(r["checkpoint"]).is_relative_to(swept.folder / RUNS_DIR / r["name"])
        assert checkpoint.metadata["epoch"] == int(r["epoch"])
        masks = checkpoint.masks.values()
        density = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        assert density == pytest.approx(float(r["density"]), rel=1e-6)


def test_results_table_plot_and_presets_are_written(swept: Sweep) -> None:
    results = swept.folder / RESULTS_DIR
    assert (results / "pareto.png").read_bytes().startswith(b"\x89PNG")
    summary = (results / "summary.md").read_text()
    assert "| configuration | 90% sparsity | 99.5% sparsity |" in summary
    assert "Pareto front" in summary
    for name in ("val acc", "density", "inf FLOPs", "train FLOPs", "Pareto"):
        assert name in swept.second_shown
    finished = [r for r in swept.rows if r["status"] == "finished"]
    for density in sorted({r["final_density"] for r in finished}):
        best = max(
            (r for r in finished if r["final_density"] == density),
            key=lambda r: float(r["accuracy"]),
        )
        preset = load_preset_file(results / "presets" / f"best-density-{float(density):g}.json")
        assert preset.granet.method == best["method"] and preset.epochs == 3
        assert preset.granet.final_density == float(density)
        assert preset.granet.start_density == float(best["start_density"])
        assert f"best at density {float(density):g}: {best['group']}" in swept.second_shown
        preflight(preset, 1)  # a training job accepts it as it is


def test_every_trial_is_one_tensorboard_run(swept: Sweep) -> None:
    """Each trial writes its own TensorBoard run in its run folder (``runs/<trial>/tb``), so
    ``tensorboard --logdir <sweep>/runs`` shows them side by side; every epoch once (a trial
    ASHA stopped may have trained an epoch past the one Tune recorded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for row in swept.rows:
        events = EventAccumulator(str(swept.folder / RUNS_DIR / row["name"] / "tb"))
        events.Reload()
        steps = [e.step for e in events.Scalars("epoch/val_accuracy")]
        assert len(steps) == len(set(steps)) >= int(row["epoch"]) >= 1, row["name"]
