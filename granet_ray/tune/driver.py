"""Sweeps on Ray Tune + Ray Train V2.

``Tuner(driver_fn, param_space={"trial": grid_search(points), "run": ...})``: each trial's
``driver_fn`` builds the ``TorchTrainer`` of its point and fits it; the workers' reports
reach Tune through ``TuneReportCallback``, where ASHA may stop the trial early on validation
accuracy (against the trials of the same sparsity level: ``asha.LevelASHA``). A trial's
Train run is named after the trial, so a trial restarted after an interruption resumes from
its last sparse checkpoint; the sweep is named after its space, so running the same command
again restores it (``Tuner.restore``) and skips finished trials.

Layout under ``storage_path/<sweep>/``: Tune's state and one folder per trial (``result.json``,
...), ``runs/<trial>/checkpoint_epoch_NNNN`` (the trials' sparse checkpoints), ``sweep.json``
(what the sweep was started with) and, once every trial has ended, ``results/``:
``trials.csv``, ``summary.md``, ``pareto.png`` and ``presets/best-density-<d_f>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.fs
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from rich.console import Console

from granet_ray.config import ConfigError, TrainConfig
from granet_ray.train import RunSettings, build_trainer, connect
from granet_ray.train.settings import ray_storage_path, storage_filesystem, storage_uri
from granet_ray.tune.asha import LevelASHA
from granet_ray.tune.display import SweepDisplay
from granet_ray.tune.presets import dump_preset, preset_file_name
from granet_ray.tune.results import (
    Analysis,
    TrialRow,
    analyze,
    groups_table,
    pareto_png,
    summary_markdown,
    trials_csv,
    trials_table,
)
from granet_ray.tune.space import (
    TRIAL_DRIVER_CPU,
    SweepSpace,
    TrialPoint,
    max_concurrent_trials,
    space_digest,
    sweep_name,
    validate,
)

RUNS_DIR = "runs"
RESULTS_DIR = "results"
SPACE_FILE = "sweep.json"

# The callbacks of the ``sweep`` call now running, by sweep name (see ``_Relay``).
_LISTENERS: dict[str, Sequence[tune.Callback]] = {}


def driver_fn(config: dict[str, Any], storage_options: dict[str, Any] | None = None) -> None:
    """One Tune trial: fit the ``TorchTrainer`` of ``config["trial"]`` (a ``TrialPoint`` as
    a dict) with the run settings ``config["run"]``, its Train run named after the trial.
    ``storage_options`` (S3 credentials) travel apart from the config, which Tune saves."""
    trial = config["trial"]
    train = TrainConfig.from_dict(trial["train"])
    run = RunSettings.from_dict(config["run"])
    run = run.replace(name=trial["name"], storage_options=storage_options)
    build_trainer(train, run, callbacks=[TuneReportCallback()]).fit()


def trainable(run: RunSettings) -> Any:
    """``driver_fn`` as Tune runs it: with ``run``'s storage options, holding
    ``TRIAL_DRIVER_CPU`` while its Train workers hold their own resources."""
    return tune.with_resources(
        tune.with_parameters(driver_fn, storage_options=run.storage_options),
        {"CPU": TRIAL_DRIVER_CPU},
    )


def trial_name(trial: Trial) -> str:
    """Tune's trial name and folder: the point's deterministic name."""
    return trial.config["trial"]["name"]


class _Relay(tune.Callback):
    """The one callback stored in the experiment (Tune pickles it and restores it with the
    sweep): it forwards trial events to the callbacks that the running ``sweep`` call
    registered under ``key``, so a resumed sweep reports to whoever resumed it."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_trial_start(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        for callback in _LISTENERS.get(self.key, ()):
            callback.on_trial_start(iteration, trials, trial, **info)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Trial, result: dict, **info: Any
    ) -> None:
        for callback in _LISTENERS.get(self.key, ()):
            callback.on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        for callback in _LISTENERS.get(self.key, ()):
            callback.on_trial_complete(iteration, trials, trial, **info)

    def on_trial_error(self, iteration: int, trials: list, trial: Trial, **info: Any) -> None:
        for callback in _LISTENERS.get(self.key, ()):
            callback.on_trial_error(iteration, trials, trial, **info)


@dataclass(frozen=True)
class SweepOutcome:
    """What a sweep call produced.

    name, uri: the sweep and its folder. rows: every trial. complete: every trial ended
    (finished, stopped early or failed); False when the sweep was interrupted: run it again
    to resume. resumed: this call restored an earlier, interrupted call. analysis: means
    over seeds, Pareto front, best configuration per level; presets: target final density ->
    URI of that configuration's preset file. plot_uri, csv_uri, summary_uri: the other
    results. All of these are None or empty until the sweep is complete.
    """

    name: str
    uri: str
    rows: list[TrialRow]
    complete: bool
    resumed: bool
    analysis: Analysis | None
    presets: dict[float, str]
    plot_uri: str | None
    csv_uri: str | None
    summary_uri: str | None


def trial_rows(
    results: tune.ResultGrid, points: Sequence[TrialPoint], run: RunSettings
) -> list[TrialRow]:
    """One ``TrialRow`` per point, in point order, from a Tune ``ResultGrid``; ``run`` is
    where the trials' Train runs store their checkpoints. A trial that reported its last
    epoch has finished (Tune does not always save the ``done`` flag of a trial that ended
    by itself), one that did not but is done was stopped by the scheduler."""
    by_name = {os.path.basename(r.path.rstrip("/")): r for r in results}
    rows = []
    for p in points:
        result = by_name.get(p.name)
        m = (result.metrics or {}) if result is not None else {}
        epoch = int(m.get("epoch", 0))
        if result is not None and result.error is not None:
            status = "error"
        elif epoch == p.train.epochs:
            status = "finished"
        elif m.get("done"):  # set on the result the scheduler stopped the trial at
            status = "stopped"
        else:
            status = "unfinished"
        checkpoint = m.get("checkpoint_path")
        rows.append(
            TrialRow(
                name=p.name,
                group=p.group,
                variant=p.variant,
                seed=p.seed,
                train=p.train,
                status=status,
                epoch=epoch,
                accuracy=m.get("val_accuracy"),
                density=m.get("density"),
                inference_flops=m.get("inference_flops"),
                training_flops=m.get("training_flops"),
                checkpoint=None if checkpoint is None else storage_uri(run, checkpoint),
                error=None if status != "error" else str(result.error).splitlines()[0],
            )
        )
    return rows


def _filesystem(run: RunSettings, uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow filesystem of the sweep's storage and ``uri``'s path on it."""
    fs = storage_filesystem(run)
    if fs is not None:
        return fs, uri.removeprefix("s3://")
    return pyarrow.fs.FileSystem.from_uri(uri)


def _write(fs: pyarrow.fs.FileSystem, path: str, data: bytes) -> None:
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def _read_json(fs: pyarrow.fs.FileSystem, path: str) -> dict[str, Any] | None:
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.readall())


def _point_dict(point: TrialPoint) -> dict[str, Any]:
    """A trial's entry in the param space (JSON-able)."""
    return {
        "name": point.name,
        "group": point.group,
        "variant": point.variant,
        "seed": point.seed,
        "train": point.train.to_dict(),
    }


def _new_tuner(
    space: SweepSpace,
    points: Sequence[TrialPoint],
    run: RunSettings,
    trial_run: RunSettings,
    name: str,
    concurrent: int,
) -> tune.Tuner:
    scheduler = None if space.asha is None else LevelASHA(space.asha, space.base.epochs)
    return tune.Tuner(
        trainable(run),
        param_space={
            "trial": tune.grid_search([_point_dict(p) for p in points]),
            "run": trial_run.replace(storage_options=None).to_dict(),
        },
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            max_concurrent_trials=concurrent,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=ray_storage_path(run),
            storage_filesystem=storage_filesystem(run),
            callbacks=[_Relay(name)],
            verbose=0,
        ),
    )


def sweep(
    space: SweepSpace,
    run: RunSettings,
    *,
    max_concurrent: int | None = None,
    progress: bool = True,
    console: Console | None = None,
    callbacks: Sequence[tune.Callback] = (),
) -> SweepOutcome:
    """Run every trial of ``space`` on Ray Tune, each a Ray Train run with ``run``'s workers,
    and write the results; resume the sweep if it was interrupted before.

    run: workers per trial and the storage (local or ``s3://``) the sweep's folder goes
    under; ``run.name`` names the sweep (None: ``sweep_name``, the same for the same space).
    max_concurrent: trials at once (None: as many as the cluster's CPUs and GPUs hold).
    progress: show live progress and the final tables on ``console`` (default: stdout).
    callbacks: Tune callbacks for this call only (they are not stored with the sweep).
    Every trial is validated before any starts (``ConfigError`` naming trial and field).
    """
    console = console or Console()
    points = validate(space, run)
    connect(dashboard=True)
    name = run.name or sweep_name(space, points, run)
    digest = space_digest(space, points, run)
    concurrent = max_concurrent or max_concurrent_trials(ray.cluster_resources(), run)
    uri = f"{run.storage_path.rstrip('/')}/{name}"
    trial_run = run.replace(name=None, storage_path=f"{uri}/{RUNS_DIR}")
    fs, path = _filesystem(run, uri)
    tune_path = f"{ray_storage_path(run).rstrip('/')}/{name}"
    resumed = tune.Tuner.can_restore(tune_path, storage_filesystem=storage_filesystem(run))
    stored = _read_json(fs, f"{path}/{SPACE_FILE}") if resumed else None
    if stored is not None and stored["digest"] != digest:
        raise ConfigError(
            f"name={name!r} is invalid: sweep {uri} was started with a different space "
            "(grid, base config or workers per trial); choose another name"
        )
    done_before = 0
    if resumed:
        tuner = tune.Tuner.restore(
            tune_path,
            trainable=trainable(run),
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage_filesystem(run),
        )
        before = trial_rows(tuner.get_results(), points, trial_run)
        done_before = sum(r.status in ("finished", "stopped") for r in before)
    else:
        tuner = _new_tuner(space, points, run, trial_run, name, concurrent)
    if stored is None:
        info = {"digest": digest, "trials": [p.name for p in points], "space": _space_dict(space)}
        _write(fs, f"{path}/{SPACE_FILE}", json.dumps(info, indent=2).encode())
    if progress:
        verb = "resuming" if resumed else "starting"
        console.print(
            f"{verb} sweep [bold]{name}[/] ({uri}): {len(points)} trials, "
            f"{done_before} done before, up to {concurrent} at once, "
            f"{run.num_workers} worker(s) each" + (", ASHA early stopping" if space.asha else ""),
            highlight=False,
        )
    display = SweepDisplay(console, total=len(points), done=done_before, enabled=progress)
    _LISTENERS[name] = [display, *callbacks]
    try:
        with display:
            results = tuner.fit()
    finally:
        _LISTENERS.pop(name, None)
    rows = trial_rows(results, points, trial_run)
    if progress:
        console.print(trials_table(rows, title=f"sweep {name}: trials"))
    left = sum(r.status == "unfinished" for r in rows)
    if left:
        if progress:
            console.print(
                f"[yellow]sweep {name} interrupted with {left} trial(s) left: run the same "
                "command again to resume it (finished trials are not run again)[/]"
            )
        return SweepOutcome(name, uri, rows, False, resumed, None, {}, None, None, None)
    title = f"{space.base.model} / {space.base.dataset}, {space.base.epochs} epochs: {name}"
    outcome = _write_results(rows, name, uri, resumed, title, fs, path, run)
    if progress:
        _print_results(outcome, console)
    return outcome


def _space_dict(space: SweepSpace) -> dict[str, Any]:
    data = dataclasses.asdict(space)
    data["base"] = space.base.to_dict()
    return data


def _write_results(
    rows: list[TrialRow],
    name: str,
    uri: str,
    resumed: bool,
    title: str,
    fs: pyarrow.fs.FileSystem,
    path: str,
    run: RunSettings,
) -> SweepOutcome:
    """Write ``results/`` of a sweep whose trials have all ended (``path`` on ``fs``)."""
    analysis = analyze(rows)
    folder = f"{path}/{RESULTS_DIR}"
    presets = {}
    for density, group in analysis.best.items():
        file = f"{folder}/presets/{preset_file_name(density)}"
        _write(fs, file, dump_preset(group.train))
        presets[density] = storage_uri(run, file)
    files = {
        "trials.csv": trials_csv(rows),
        "summary.md": summary_markdown(name, rows, analysis).encode(),
        "pareto.png": pareto_png(rows, analysis, title=title),
    }
    for file, data in files.items():
        _write(fs, f"{folder}/{file}", data)
    return SweepOutcome(
        name=name,
        uri=uri,
        rows=rows,
        complete=True,
        resumed=resumed,
        analysis=analysis,
        presets=presets,
        plot_uri=storage_uri(run, f"{folder}/pareto.png"),
        csv_uri=storage_uri(run, f"{folder}/trials.csv"),
        summary_uri=storage_uri(run, f"{folder}/summary.md"),
    )


def _print_results(outcome: SweepOutcome, console: Console) -> None:
    analysis = outcome.analysis
    assert analysis is not None
    best = analysis.best
    console.print(
        groups_table(analysis.groups, front=analysis.front, best=[g.group for g in best.values()])
    )
    for density, file in outcome.presets.items():
        console.print(f"best at density {density:g}: {best[density].group} -> {file}")
    console.print(f"plot: {outcome.plot_uri}\ntrials: {outcome.csv_uri}")
