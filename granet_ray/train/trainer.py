"""The driver side of a Ray Train run: connect to Ray, check that the cluster can ever hold
the run, build the ``TorchTrainer``, fit it with a live display (Ctrl-C stops it within
seconds, leaving its checkpoints), and collect what the run left behind
(``granet_ray.session.conclude``)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

from granet_ray.checks import check_data, check_storage, preflight
from granet_ray.config import ConfigError, RunSettings, TrainConfig
from granet_ray.outcome import FitOutcome
from granet_ray.recipe import Hooks
from granet_ray.session import conclude, named
from granet_ray.store import CheckpointError, list_checkpoints, open_storage
from granet_ray.store.lease import RunLease
from granet_ray.train.progress import QueueDrain
from granet_ray.train.worker import train_loop_per_worker
from granet_ray.ui import console as default_console
from granet_ray.ui.progress import RunView

# Ray Train's record of a run's reported checkpoints, in the run's folder
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"
# Whether this driver started the Ray instance it is connected to (``connect``): a private
# local instance has the CPUs and GPUs it will ever have, so a request it cannot hold fails.
_PRIVATE = {"local": False}


def connect(
    address: str | None = None,
    *,
    dashboard: bool = False,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> None:
    """Connect this driver to Ray, unless it already is.

    To ``address`` or ``$RAY_ADDRESS`` (a cluster, or the cluster a ``ray job submit`` job
    runs on), else a private local Ray instance (auth and usage stats off; worker logs stay
    in Ray's log folder, failures still reach the driver as exceptions). A private instance
    has all the CPUs and GPUs it will ever have, so ``fit`` refuses a run it cannot hold.

    Args:
        address: a Ray cluster's address.
        dashboard: also start the local dashboard on a free loopback port (sweeps: Ray Train
            gives back the CPUs of a trial ASHA stopped through the dashboard's state API);
            the instance's processes are pointed at their own dashboard
            (``RAY_API_SERVER_ADDRESS``), which no other Ray instance on the machine can then
            be mistaken for.
        num_cpus: CPUs of a private instance (default: the machine's).
        object_store_memory: bytes of a private instance's object store (default: Ray's).
    """
    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _PRIVATE["local"] = True
    options: dict[str, Any] = {
        "address": "local",
        "num_cpus": num_cpus,
        "object_store_memory": object_store_memory,
        "include_dashboard": dashboard,
        "log_to_driver": False,
    }
    if dashboard:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        options.update(
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        )
    ray.init(**options)


def progress_queue() -> Queue:
    """The queue worker rank 0 sends progress events to, on this driver's node: a worker
    node that goes away (an elastic run losing a node) must not take the queue with it."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def forget_deleted_checkpoints(run: RunSettings) -> list[str]:
    """Make Ray Train's record of a run's checkpoints (its ``checkpoint_manager_snapshot.json``)
    name only checkpoints that still exist: retention deletes old checkpoints behind Ray's
    back, and Ray refuses to restore a run whose record names a missing one. Entries of
    deleted checkpoints are dropped (the record is removed when it cannot be read: a run
    resumes from its folder's newest checkpoint, never from Ray's record). Returns the
    directory names dropped."""
    folder = open_storage(run.run_uri, run.storage_options)
    raw = folder.get(RAY_SNAPSHOT)
    if raw is None:
        return []
    found = list_checkpoints(run.run_uri, run.storage_options)
    there = {uri.rstrip("/").rpartition("/")[2] for uri in found}
    try:
        state = json.loads(raw)
        results = state["checkpoint_results"]
        names = [r["checkpoint_dir_name"] for r in results]
        gone = [n for n in names if n not in there]
        if not gone:
            return []
        kept = [i for i, n in enumerate(names) if n in there]
        state["checkpoint_results"] = [results[i] for i in kept]
        state["checkpoint_report_indices"] = [state["checkpoint_report_indices"][i] for i in kept]
        pending = state["pending_training_results"]
        specs = state["pending_validation_specs"]
        alive = [i for i, r in enumerate(pending) if r["checkpoint_dir_name"] in there]
        state["pending_training_results"] = [pending[i] for i in alive]
        state["pending_validation_specs"] = [specs[i] for i in alive]
        latest = state.get("latest_checkpoint_result")
        if latest is not None and latest["checkpoint_dir_name"] not in there:
            state["latest_checkpoint_result"] = results[kept[-1]] if kept else None
        folder.put(RAY_SNAPSHOT, json.dumps(state).encode())
    except (ValueError, KeyError, TypeError, IndexError):
        folder.delete(RAY_SNAPSHOT)
        return [RAY_SNAPSHOT]
    return gone


def build_trainer(
    train: TrainConfig,
    run: RunSettings,
    *,
    callbacks: list[Any] | None = None,
    progress_queue: Queue | None = None,
    hooks: Sequence[Hooks] = (),
    runtime_env: dict[str, Any] | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` for ``train`` executed as ``run`` says; the configuration is checked
    first (``ConfigError`` naming the field, before any worker starts).

    callbacks: Ray Train ``UserCallback``s for ``RunConfig``. progress_queue: a
    ``ray.util.queue.Queue`` that worker rank 0 sends live events to. hooks: extra
    (picklable) ``recipe.Hooks`` every worker runs, e.g. ``granet_ray.testing.hooks.CrashAt``.
    runtime_env: the workers' Ray runtime env (Ray Train's ``worker_runtime_env``), e.g.
    ``{"py_modules": [...]}`` or ``{"env_vars": {"PYTHONPATH": ...}}`` so that they import
    a model or dataset given by reference (docs/your-model.md).
    Checks nothing itself: ``fit`` and ``sweep`` check a run once before they build it.
    Ray's record of the run's checkpoints is brought in step with its folder first
    (``forget_deleted_checkpoints``).
    """
    run = named(run, train)
    forget_deleted_checkpoints(run)
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
            worker_runtime_env=runtime_env,
        ),
    )


def worker_resources(settings: RunSettings) -> dict[str, float]:
    """What one Train worker of ``settings`` asks Ray for."""
    need = {"CPU": float(settings.cpus_per_worker)}
    if settings.use_gpu:
        need["GPU"] = float(settings.gpus_per_worker)
    return need


def capacity_shortfall(settings: RunSettings, cluster: Mapping[str, float]) -> str | None:
    """Why ``cluster`` (total resources, ``ray.cluster_resources()``) can never start the
    fewest workers ``settings`` accepts, or None when it can."""
    need = worker_resources(settings)
    fewest = settings.min_workers or settings.num_workers
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items())
    if fits >= fewest:
        return None
    wanted = ", ".join(f"{fewest * v:g} {k}" for k, v in need.items())
    have = ", ".join(f"{cluster.get(k, 0.0):g} {k}" for k in need)
    return (
        f"num_workers={settings.num_workers} is invalid: {fewest} worker(s) need {wanted} "
        f"(workers x cpus_per_worker / gpus_per_worker) and this Ray instance has {have} in "
        "all; lower --num-workers, --cpus-per-worker or --gpus-per-worker"
    )


def waiting_for(settings: RunSettings) -> str:
    """The display's status while the worker group waits for capacity on a cluster."""
    need = worker_resources(settings)
    fewest = settings.min_workers or settings.num_workers
    free = ray.available_resources()
    wanted = " + ".join(f"{v:g} {k}" for k, v in need.items())
    have = ", ".join(f"{free.get(k, 0.0):g} {k}" for k in need)
    return f"waiting for {fewest} worker(s) of {wanted} ({have} free now)"


def fit(
    train: TrainConfig,
    run: RunSettings,
    *,
    address: str | None = None,
    progress: bool = True,
    summary: bool = True,
    console: Console | None = None,
    hooks: Sequence[Hooks] = (),
    runtime_env: dict[str, Any] | None = None,
) -> FitOutcome:
    """Train ``train`` on Ray Train workers as ``run`` says and return what it produced.

    The run is checked once before Ray is contacted (configuration against the real data,
    model and schedule; the storage reachable and writable); a private local Ray that can
    never hold the workers fails at once. The run resumes from the newest checkpoint of its
    folder when ``run.name`` names an existing run.

    Args:
        train: the recipe.
        run: workers, resources, storage, name, checkpoints and failures.
        address: the Ray cluster (default: ``$RAY_ADDRESS``, else a private local Ray).
        progress: show the live display on ``console``.
        summary: print the final per-layer and outcome tables on ``console``.
        console: where to print (default: stdout, wide when it is a pipe).
        hooks: extra picklable ``recipe.Hooks`` every worker runs.
        runtime_env: the workers' Ray runtime env, e.g. ``{"py_modules": [...]}`` or
            ``{"env_vars": {"PYTHONPATH": ...}}`` for a model or dataset by reference that
            the workers cannot import otherwise (docs/your-model.md).

    Returns:
        The ``FitOutcome`` of the run's newest committed checkpoint.

    Raises:
        ConfigError: a bad value, on the driver or in a worker, naming the field.
        CheckpointError: a storage or checkpoint problem, naming the URI; ``LeaseHeldError``
            when another live run holds the run's folder.
        KeyboardInterrupt: Ctrl-C; the workers are stopped, the checkpoints stay.
        ray.train.TrainingFailedError: other worker failures beyond ``run.max_failures``.
    """
    preflight(train, run.num_workers, run.use_gpu)
    check_data(train, run)
    check_storage(run)
    run = named(run, train)
    connect(address)
    if _PRIVATE["local"]:
        problem = capacity_shortfall(run, ray.cluster_resources())
        if problem:
            raise ConfigError(problem)
    console = console or default_console()
    # the driver holds the run's lease: worker restarts and resizes never drop it
    with RunLease(run.run_uri, run.storage_options, renew_s=run.lease_renew_s):
        queue = progress_queue() if progress else None
        try:
            trainer = build_trainer(
                train, run, progress_queue=queue, hooks=hooks, runtime_env=runtime_env
            )
            with RunView(console, enabled=progress) as view:
                drain = QueueDrain(queue, view) if queue is not None else contextlib.nullcontext()
                with drain:
                    _fit(trainer, view, run)
        finally:
            if queue is not None and ray.is_initialized():
                queue.shutdown()
        return conclude(train, run, console=console, summary=summary)


def _fit(trainer: TorchTrainer, view: RunView, settings: RunSettings) -> None:
    """``trainer.fit()`` in a thread while this one shows what the run waits for and stays
    responsive to Ctrl-C: an interrupt stops the worker group (and a private local Ray)
    within seconds. A worker's configuration or checkpoint error is raised as itself."""
    outcome: dict[str, BaseException | None] = {"error": None}

    def target() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # handed to the main thread, raised there
            outcome["error"] = err

    thread = threading.Thread(target=target, name="granet-fit", daemon=True)
    began = time.monotonic()
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
            if not view.started and time.monotonic() - began > 5:
                view.update(status=waiting_for(settings))
    except KeyboardInterrupt:
        view.print(
            f"[yellow]interrupted: stopping the workers; the run's checkpoints stay in "
            f"{settings.run_uri}[/]"
        )
        ray.shutdown()
        raise
    error = outcome["error"]
    if error is None:
        return
    if isinstance(error, ray.train.TrainingFailedError):
        for failure in getattr(error, "worker_failures", {}).values():
            cause: BaseException | None = failure
            while cause is not None:
                if isinstance(cause, (ConfigError, CheckpointError)):
                    raise cause from None
                cause = cause.__cause__
    raise error
