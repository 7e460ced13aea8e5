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

import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from rich.console import Console

from granet_ray.checks import check_storage
from granet_ray.config import (
    ConfigError,
    RunSettings,
    TrainConfig,
    dump_preset,
    preset_file_name,
)
from granet_ray.events import RANK_METRIC, TIME_METRIC
from granet_ray.store import Storage, open_storage
from granet_ray.train import build_trainer, connect
from granet_ray.tune.asha import LevelASHA
from granet_ray.tune.progress import SweepDisplay
from granet_ray.tune.results import (
    Analysis,
    TrialRow,
    analyze,
    pareto_png,
    summary_markdown,
    trials_csv,
)
from granet_ray.tune.space import (
    TRIAL_DRIVER_CPU,
    SweepSpace,
    TrialPoint,
    max_concurrent_trials,
    settle_asha,
    space_digest,
    sweep_name,
    validate,
)
from granet_ray.tune.tables import groups_table, trials_table
from granet_ray.ui import console as default_console

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
    results: tune.ResultGrid, points: Sequence[TrialPoint], storage: Storage
) -> list[TrialRow]:
    """One ``TrialRow`` per point, in point order, from a Tune ``ResultGrid``; ``storage``
    is the sweep's storage (it maps the checkpoint paths Ray reports to URIs). A trial that
    reported its last epoch has finished (Tune does not always save the ``done`` flag of a
    trial that ended by itself), one that did not but is done was stopped by the scheduler."""
    by_name = {os.path.basename(r.path.rstrip("/")): r for r in results}
    rows = []
    for p in points:
        result = by_name.get(p.name)
        m = (result.metrics or {}) if result is not None else {}
        epoch = int(m.get(TIME_METRIC, 0))
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
                accuracy=m.get(RANK_METRIC),
                density=m.get("density"),
                inference_flops=m.get("inference_flops"),
                training_flops=m.get("training_flops"),
                checkpoint=None if checkpoint is None else storage.uri_of(checkpoint),
                error=None if status != "error" else str(result.error).splitlines()[0],
            )
        )
    return rows


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
    filesystem, path = open_storage(run.storage_path, run.storage_options).arrow_filesystem()
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
            storage_path=path,
            storage_filesystem=filesystem,
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
    address: str | None = None,
) -> SweepOutcome:
    """Run every trial of ``space`` on Ray Tune, each a Ray Train run with ``run``'s workers,
    and write the results; resume the sweep if it was interrupted before. Every trial is
    validated and the storage probed once, before Ray is contacted.

    Args:
        space: the validated search space (``tune.space.load_space``).
        run: workers per trial and the storage (local or ``s3://``) the sweep's folder goes
            under; ``run.name`` names the sweep (None: ``sweep_name``, the same for the same
            space, so the same command resumes the same sweep).
        max_concurrent: trials at once (None: as many as the cluster's CPUs and GPUs hold).
        progress: show live progress and the final tables on ``console``.
        console: where to print (default: stdout, wide when it is a pipe).
        callbacks: Tune callbacks for this call only (they are not stored with the sweep).
        address: the Ray cluster (default: ``$RAY_ADDRESS``, else a private local Ray).

    Returns:
        The ``SweepOutcome``: every trial's row and, once all ended, the results' URIs.

    Raises:
        ConfigError: an invalid trial (naming trial and field), a sweep name used by another
            space, or a cluster that cannot hold one trial.
        StorageError: the storage cannot be reached or written.
    """
    console = console or default_console()
    points = validate(space, run)
    space, asha_note = settle_asha(space, points)
    check_storage(run)
    connect(address, dashboard=True)
    name = run.name or sweep_name(space, points, run)
    digest = space_digest(space, points, run)
    concurrent = max_concurrent or max_concurrent_trials(ray.cluster_resources(), run)
    root = open_storage(run.storage_path, run.storage_options)
    folder = root.sub(name)
    trial_run = run.replace(name=None, storage_path=f"{folder.uri}/{RUNS_DIR}")
    filesystem, path = root.arrow_filesystem()
    tune_path = f"{path.rstrip('/')}/{name}"
    resumed = tune.Tuner.can_restore(tune_path, storage_filesystem=filesystem)
    stored = folder.get(SPACE_FILE) if resumed else None
    if stored is not None and json.loads(stored)["digest"] != digest:
        raise ConfigError(
            f"name={name!r} is invalid: sweep {folder.uri} was started with a different space "
            "(grid, base config or workers per trial); choose another name"
        )
    done_before = 0
    if resumed:
        tuner = tune.Tuner.restore(
            tune_path,
            trainable=trainable(run),
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
        before = trial_rows(tuner.get_results(), points, root)
        done_before = sum(r.status in ("finished", "stopped") for r in before)
    else:
        tuner = _new_tuner(space, points, run, trial_run, name, concurrent)
    if stored is None:
        info = {"digest": digest, "trials": [p.name for p in points], "space": _space_dict(space)}
        folder.put(SPACE_FILE, json.dumps(info, indent=2).encode())
    if progress:
        if asha_note:
            console.print(f"[yellow]{asha_note}[/]", highlight=False)
        verb = "resuming" if resumed else "starting"
        console.print(
            f"{verb} sweep [bold]{name}[/] ({folder.uri}): {len(points)} trials, "
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
    rows = trial_rows(results, points, root)
    if progress:
        console.print(trials_table(rows, title=f"sweep {name}: trials"))
    left = sum(r.status == "unfinished" for r in rows)
    if left:
        if progress:
            console.print(
                f"[yellow]sweep {name} interrupted with {left} trial(s) left: run the same "
                "command again to resume it (finished trials are not run again)[/]"
            )
        return SweepOutcome(name, folder.uri, rows, False, resumed, None, {}, None, None, None)
    title = f"{space.base.model} / {space.base.dataset}, {space.base.epochs} epochs: {name}"
    outcome = _write_results(rows, name, resumed, title, folder)
    if progress:
        _print_results(outcome, console)
    return outcome


def _space_dict(space: SweepSpace) -> dict[str, Any]:
    data = dataclasses.asdict(space)
    data["base"] = space.base.to_dict()
    return data


def _write_results(
    rows: list[TrialRow], name: str, resumed: bool, title: str, folder: Storage
) -> SweepOutcome:
    """Write ``results/`` into the ``folder`` of a sweep whose trials have all ended."""
    analysis = analyze(rows)
    results = folder.sub(RESULTS_DIR)
    presets = {}
    for density, group in analysis.best.items():
        file = f"presets/{preset_file_name(density)}"
        results.put(file, dump_preset(group.train))
        presets[density] = f"{results.uri}/{file}"
    files = {
        "trials.csv": trials_csv(rows),
        "summary.md": summary_markdown(name, rows, analysis).encode(),
        "pareto.png": pareto_png(rows, analysis, title=title),
    }
    for file, data in files.items():
        results.put(file, data)
    return SweepOutcome(
        name=name,
        uri=folder.uri,
        rows=rows,
        complete=True,
        resumed=resumed,
        analysis=analysis,
        presets=presets,
        plot_uri=f"{results.uri}/pareto.png",
        csv_uri=f"{results.uri}/trials.csv",
        summary_uri=f"{results.uri}/summary.md",
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
