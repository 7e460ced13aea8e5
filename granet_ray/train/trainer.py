"""The driver side of a Ray Train run: build the ``TorchTrainer``, fit it with a live
display, and gather what the run produced (metrics, checkpoint URI and size, per-layer
summary, per-update statistics, a plot) into a ``FitOutcome``."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

import pyarrow.fs
import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Queue
from rich.console import Console
from rich.table import Table

from granet_ray.config import ConfigError, TrainConfig
from granet_ray.plots import training_plot
from granet_ray.report import layer_table
from granet_ray.store import CheckpointError, load_sparse
from granet_ray.train.preflight import preflight
from granet_ray.train.progress import ProgressDisplay
from granet_ray.train.settings import (
    RunSettings,
    ray_storage_path,
    run_name,
    run_uri,
    storage_filesystem,
    storage_uri,
)
from granet_ray.train.worker import CrashAt, train_loop_per_worker

PLOT_NAME = "training.png"
HISTORY_NAME = "history.json"


@dataclass(frozen=True)
class FitOutcome:
    """What a finished run produced.

    metrics: the last ``ray.train.report`` (accuracy, density, FLOPs, ...). checkpoint_uri:
    the final checkpoint (open it with ``granet_ray.load_sparse``); checkpoint_bytes: its
    size. summary: ``GraNet.summary()`` at the end (per-layer rows, relative FLOPs).
    history: per-mask-update statistics; epochs: per-epoch metrics. run_uri: the run's
    folder, which also holds ``history.json`` and the plot ``training.png`` (plot_uri).
    """

    name: str
    metrics: dict[str, Any]
    checkpoint_uri: str
    checkpoint_bytes: int
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    epochs: list[dict[str, Any]]
    run_uri: str
    plot_uri: str


def connect(address: str | None = None, *, dashboard: bool = False) -> None:
    """Connect this driver to Ray: to ``address`` or ``$RAY_ADDRESS`` (a cluster, or the
    cluster a ``ray job submit`` job runs on), else start a private local Ray instance with
    this machine's CPUs (auth and usage stats off; worker logs stay in Ray's log folder,
    failures still reach the driver as exceptions).

    ``dashboard=True`` (sweeps) also starts the local dashboard on a free loopback port: Ray
    Train gives back the CPUs of a trial that ASHA stopped through the dashboard's state API,
    so the instance's processes are pointed at their own dashboard
    (``RAY_API_SERVER_ADDRESS``), which other Ray instances on the machine cannot then be
    mistaken for."""
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not dashboard:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        return
    port = _free_port()
    ray.init(
        address="local",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        log_to_driver=False,
    )


def _free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_trainer(
    train: TrainConfig,
    run: RunSettings,
    *,
    callbacks: list[Any] | None = None,
    progress_queue: Queue | None = None,
    fault: CrashAt | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` for ``train`` executed as ``run`` says; the configuration is checked
    first (``ConfigError`` naming the field, before any worker starts).

    callbacks: Ray Train ``UserCallback``s for ``RunConfig``. progress_queue: a
    ``ray.util.queue.Queue`` that worker rank 0 sends live events to. fault: crash one worker
    once (tests of crash-resume; see ``CrashAt``).
    """
    preflight(train, run.num_workers)
    run = run.replace(name=run.name or run_name(train))
    config: dict[str, Any] = {"train": train.to_dict(), "run": run.to_dict()}
    if progress_queue is not None:
        config["progress"] = progress_queue
    if fault is not None:
        config["crash"] = dataclasses.asdict(fault)
    resources = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = run.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if run.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=run.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=ray_storage_path(run),
            storage_filesystem=storage_filesystem(run),
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            callbacks=callbacks,
        ),
    )


def fit(
    train: TrainConfig,
    run: RunSettings,
    *,
    progress: bool = True,
    console: Console | None = None,
) -> FitOutcome:
    """Train ``train`` on Ray as ``run`` says and return what it produced. With ``progress``
    the driver shows a live display and a final summary table on ``console`` (default:
    stdout). A configuration error, on the driver or in a worker, raises ``ConfigError``;
    other worker failures raise Ray's ``TrainingFailedError``."""
    preflight(train, run.num_workers)  # before Ray is contacted (the queue is an actor)
    run = run.replace(name=run.name or run_name(train))
    console = console or _console()
    queue = Queue(actor_options={"num_cpus": 0}) if progress else None
    try:
        trainer = build_trainer(train, run, progress_queue=queue)
        if queue is None:
            result = _fit(trainer)
        else:
            with ProgressDisplay(queue, console):
                result = _fit(trainer)
    finally:
        if queue is not None:
            queue.shutdown()
    outcome = _outcome(train, run, result)
    if progress:
        console.print(layer_table(outcome.summary, title=f"{train.model}: final sparse model"))
        console.print(outcome_table(outcome))
    return outcome


def _console() -> Console:
    """Stdout; 120 columns wide when it is not a terminal (job logs, pipes) instead of 80."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def _fit(trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``, re-raising a worker's configuration or checkpoint error as itself."""
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        for failure in getattr(err, "worker_failures", {}).values():
            cause: BaseException | None = failure
            while cause is not None:
                if isinstance(cause, (ConfigError, CheckpointError)):
                    raise cause from None
                cause = cause.__cause__
        raise


def _outcome(train: TrainConfig, run: RunSettings, result: ray.train.Result) -> FitOutcome:
    """Read the final checkpoint's metadata, save ``history.json`` and the plot beside the
    checkpoints, and collect the outcome."""
    if result.checkpoint is None:
        raise RuntimeError(f"run {run.name} finished without a checkpoint")
    checkpoint_uri = storage_uri(run, result.checkpoint.path)
    metadata = load_sparse(checkpoint_uri, storage_options=run.storage_options).metadata
    history = metadata["engine"]["history"]
    fs: pyarrow.fs.FileSystem = result.filesystem
    with fs.open_output_stream(f"{result.path}/{HISTORY_NAME}") as out:
        out.write(json.dumps({"updates": history, "epochs": metadata["epochs"]}).encode())
    plot = training_plot(
        history,
        metadata["epochs"],
        start_density=train.granet.start_density,
        title=f"{train.model} / {train.dataset}: {train.granet.method}",
    )
    with fs.open_output_stream(f"{result.path}/{PLOT_NAME}") as out:
        out.write(plot)
    files = fs.get_file_info(pyarrow.fs.FileSelector(result.checkpoint.path, recursive=True))
    return FitOutcome(
        name=run.name or "",
        metrics=dict(result.metrics or {}),
        checkpoint_uri=checkpoint_uri,
        checkpoint_bytes=sum(f.size or 0 for f in files if f.is_file),
        summary=metadata["summary"],
        history=history,
        epochs=metadata["epochs"],
        run_uri=run_uri(run),
        plot_uri=f"{run_uri(run)}/{PLOT_NAME}",
    )


def outcome_table(outcome: FitOutcome) -> Table:
    """The run's headline numbers: accuracy, density, FLOPs, checkpoint URI and size."""
    m = outcome.metrics
    table = Table(title=f"run {outcome.name}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("validation accuracy", f"{m['val_accuracy']:.2%} (all workers)")
    table.add_row("density", f"{m['density']:.4f} (sparsity {1 - m['density']:.2%})")
    table.add_row("inference FLOPs", f"{m['inference_flops']:.4f} x dense")
    table.add_row("training FLOPs", f"{m['training_flops']:.4f} x dense")
    table.add_row("mask updates", str(len(outcome.history)))
    table.add_row("checkpoint", outcome.checkpoint_uri)
    table.add_row("checkpoint size", f"{outcome.checkpoint_bytes / 2**20:.2f} MiB")
    table.add_row("plot", outcome.plot_uri)
    return table
