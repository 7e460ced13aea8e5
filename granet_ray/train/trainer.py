"""The driver side of a Ray Train run: connect to Ray, build the ``TorchTrainer``, fit it
with a live display, and collect what the run left behind (``granet_ray.outcome``)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

from granet_ray.checks import check_storage, preflight
from granet_ray.config import ConfigError, RunSettings, TrainConfig, run_name
from granet_ray.outcome import FitOutcome, finish
from granet_ray.recipe import Hooks
from granet_ray.store import CheckpointError, open_storage
from granet_ray.train.progress import QueueDrain
from granet_ray.train.worker import train_loop_per_worker
from granet_ray.ui import console as default_console
from granet_ray.ui.progress import RunView
from granet_ray.ui.tables import layer_table, outcome_table


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(
        address="local",
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        log_to_driver=False,
    )


def progress_queue() -> Queue:
    """The queue worker rank 0 sends progress events to, on this driver's node: a worker
    node that goes away (an elastic run losing a node) must not take the queue with it."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def build_trainer(
    train: TrainConfig,
    run: RunSettings,
    *,
    callbacks: list[Any] | None = None,
    progress_queue: Queue | None = None,
    hooks: Sequence[Hooks] = (),
) -> TorchTrainer:
    """A ``TorchTrainer`` for ``train`` executed as ``run`` says; the configuration is checked
    first (``ConfigError`` naming the field, before any worker starts).

    callbacks: Ray Train ``UserCallback``s for ``RunConfig``. progress_queue: a
    ``ray.util.queue.Queue`` that worker rank 0 sends live events to. hooks: extra
    (picklable) ``recipe.Hooks`` every worker runs, e.g. ``granet_ray.testing.hooks.CrashAt``.
    """
    preflight(train, run.num_workers, run.use_gpu)
    run = run.replace(name=run.name or run_name(train))
    config: dict[str, Any] = {"train": train.to_dict(), "run": run.to_dict()}
    if progress_queue is not None:
        config["progress"] = progress_queue
    if hooks:
        config["hooks"] = list(hooks)
    resources = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = run.gpus_per_worker
    filesystem, path = open_storage(run.storage_path, run.storage_options).arrow_filesystem()
    workers: int | tuple[int, int] = run.num_workers
    elastic: dict[str, Any] = {}
    if run.elastic:  # (min, max): Train V2 starts once min are up and resizes as nodes come and go
        workers = (run.min_workers or 1, run.num_workers)
        elastic["elastic_resize_monitor_interval_s"] = run.resize_interval
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if run.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=run.use_gpu,
            resources_per_worker=resources,
            **elastic,
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=path,
            storage_filesystem=filesystem,
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
    hooks: Sequence[Hooks] = (),
) -> FitOutcome:
    """Train ``train`` on Ray as ``run`` says and return what it produced. With ``progress``
    the driver shows a live display and a final summary on ``console`` (default: stdout,
    wide when it is a pipe). A configuration or checkpoint error, on the driver or in a
    worker, raises itself; other worker failures raise Ray's ``TrainingFailedError``."""
    preflight(train, run.num_workers, run.use_gpu)
    check_storage(run)
    run = run.replace(name=run.name or run_name(train))
    console = console or default_console()
    queue = progress_queue() if progress else None
    try:
        trainer = build_trainer(train, run, progress_queue=queue, hooks=hooks)
        with RunView(console, enabled=progress) as view:
            if queue is None:
                result = _fit(trainer)
            else:
                with QueueDrain(queue, view):
                    result = _fit(trainer)
    finally:
        if queue is not None:
            queue.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"run {run.name} finished without a checkpoint")
    storage = open_storage(run.storage_path, run.storage_options)
    outcome = finish(train, run, storage.uri_of(result.checkpoint.path))
    if progress:
        console.print(layer_table(outcome.summary, title=f"{train.model}: final sparse model"))
        console.print(outcome_table(outcome))
    return outcome


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
