"""Watching a run: TensorBoard event files in the run's folder (by default) and an MLflow run
(when asked), written by the one process that writes the run's checkpoints (the run in this
process, or Ray Train's worker rank 0).

What is logged: every global step's loss (rank 0's share), learning rate and throughput
(``train/...``), every epoch's ``EpochMetrics`` (``epoch/...``), every mask update's density,
counts, postponement and per-layer densities (``masks/...``, ``layers/...``), and every
resize (``run/world_size``). Step values are read off the device in batches (at a mask
update, a checkpoint, an epoch end, or every ``flush_s`` seconds), so logging adds no host
sync to other steps.

A resumed run continues the same curves: its TensorBoard writer starts with a purge at the
first step it trains, so the points an interrupted run wrote after its last checkpoint are
dropped by TensorBoard's reader, and every step appears once; its MLflow run id is kept in
the run's folder (``mlflow.json``), and the resumed run continues that MLflow run.
TensorBoard files of an S3 run are written to a local temporary folder and uploaded through
the store at every flush.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from granet_ray.config import ConfigError, RunSettings, TrainConfig
from granet_ray.events import EpochMetrics
from granet_ray.recipe import Hooks, Position, Run, StepInfo
from granet_ray.store import Storage, open_storage

TB_DIR = "tb"
MLFLOW_FILE = "mlflow.json"
FLUSH_S = 10.0
ROLL_BYTES = 4 * 2**20  # S3: an event file this large is closed and a new one started
Scalar = tuple[str, float, int]  # (tag, value, global step)


def flat_params(train: TrainConfig) -> dict[str, str]:
    """The resolved ``TrainConfig`` as dotted keys (``granet.final_density``) -> text."""
    out: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{prefix}{key}.")
        else:
            out[prefix.rstrip(".")] = json.dumps(value) if not isinstance(value, str) else value

    walk(train.to_dict(), "")
    return out


def update_scalars(stats: Mapping[str, Any]) -> list[Scalar]:
    """The scalars of one mask update (an entry of ``engine.history``)."""
    step = int(stats["step"])
    out: list[Scalar] = [
        (f"masks/{key}", float(stats[key]), step)
        for key in ("density", "pruned", "regrown", "grown")
        if stats.get(key) is not None
    ]
    out.append(("masks/postponed_steps", float(step - int(stats["due_step"])), step))
    out.append(("masks/superseded", float(len(stats.get("superseded", []))), step))
    if stats.get("target_density") is not None:
        out.append(("masks/target_density", float(stats["target_density"]), step))
    for name, layer in stats.get("layers", {}).items():
        out.append((f"layers/{name}/density", float(layer["density"]), step))
    return out


class TensorBoardSink:
    """Event files in ``<run>/tb``: written there on local disk, else in a temporary folder
    whose changed files are uploaded through the store at every flush (a file that reached
    ``ROLL_BYTES`` is closed, uploaded a last time and followed by a new one, so a flush
    never uploads much). ``start_step``: the last step already trained (points after it
    from an earlier, interrupted writer are purged)."""

    def __init__(self, settings: RunSettings, start_step: int) -> None:
        self.storage: Storage = open_storage(
            f"{settings.run_uri}/{TB_DIR}", settings.storage_options
        )
        self.temp = None if self.storage.local else tempfile.mkdtemp(prefix="granet-tb-")
        self.folder = self.storage.uri if self.temp is None else self.temp
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        self.uploaded: dict[str, int] = {}  # S3: file name -> bytes uploaded
        self.writer = self._writer(start_step + 1 if start_step > 0 else None)

    def _writer(self, purge_step: int | None) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(self.folder, purge_step=purge_step, flush_secs=3600)

    def write(self, scalars: Sequence[Scalar]) -> None:
        for tag, value, step in scalars:
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()
        if self.temp is None:
            return
        full = False
        for path in sorted(Path(self.temp).iterdir()):  # the current file alone
            size = path.stat().st_size
            if self.uploaded.get(path.name) != size:
                self.storage.put(path.name, path.read_bytes())
                self.uploaded[path.name] = size
            full = size >= ROLL_BYTES
        if full:  # uploaded for good: the next file holds what follows
            self.writer.close()
            for path in Path(self.temp).iterdir():
                path.unlink()
            self.writer = self._writer(None)

    def close(self, checkpoint: str | None) -> None:
        self.flush()
        self.writer.close()
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)


class MlflowSink:
    """One MLflow run per granet-ray run: params (the resolved ``TrainConfig``), the same
    scalars as TensorBoard, and the final checkpoint's URI (tag ``checkpoint_uri``). The run
    id is stored in the run's folder (``mlflow.json``); a resumed run continues it."""

    def __init__(self, settings: RunSettings, train: TrainConfig) -> None:
        try:
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(
                "mlflow_uri is set but mlflow is not installed: pip install 'granet-ray[mlflow]'"
            ) from None
        uri = str(settings.mlflow_uri)
        self.client = MlflowClient(tracking_uri=uri)
        self.folder = open_storage(settings.run_uri, settings.storage_options)
        self.run_id = self._existing(uri)
        self.pending: list[Any] = []
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(settings.mlflow_experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(settings.mlflow_experiment)
        )
        created = self.client.create_run(
            experiment_id,
            run_name=settings.name,
            tags={"granet_ray.run_uri": settings.run_uri},
        )
        self.run_id = created.info.run_id
        params = [Param(k, v[:6000]) for k, v in sorted(flat_params(train).items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag("granet_ray.name", str(settings.name))])
        record = {"tracking_uri": uri, "run_id": self.run_id}
        self.folder.put(MLFLOW_FILE, json.dumps(record).encode())

    def _existing(self, uri: str) -> str | None:
        """The MLflow run id this run logged to before, on the same tracking URI."""
        raw = self.folder.get(MLFLOW_FILE)
        if raw is None:
            return None
        record = json.loads(raw)
        return record["run_id"] if record.get("tracking_uri") == uri else None

    def write(self, scalars: Sequence[Scalar]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.pending += [Metric(tag, value, stamp, step) for tag, value, step in scalars]

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:1000], self.pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, checkpoint: str | None) -> None:
        self.flush()
        if checkpoint is not None:
            self.client.set_tag(self.run_id, "checkpoint_uri", checkpoint)
            self.client.set_terminated(self.run_id, "FINISHED")


class WatchHooks(Hooks):
    """Hands a run's steps, epochs, mask updates and resizes to the sinks (TensorBoard,
    MLflow) of ``settings``; values are read off the device in batches (see the module)."""

    def __init__(self, sinks: list[Any], flush_s: float = FLUSH_S) -> None:
        self.sinks = sinks
        self.flush_s = flush_s
        self._steps: list[tuple[int, torch.Tensor, float, int]] = []
        self._window = time.perf_counter()
        self._last_flush = time.monotonic()

    def _each(self, action: str, *args: Any) -> None:
        """``sink.<action>(*args)`` on every sink; a sink that fails is dropped with a
        warning: watching a run never stops it."""
        for sink in list(self.sinks):
            try:
                getattr(sink, action)(*args)
            except Exception as exc:  # storage, MLflow server, event writer: all alike
                self.sinks.remove(sink)
                warnings.warn(
                    f"{type(sink).__name__} stopped ({action} failed: {exc}); the run goes on",
                    stacklevel=2,
                )

    def write(self, scalars: Sequence[Scalar]) -> None:
        self._each("write", scalars)

    def on_step(self, run: Run, info: StepInfo) -> None:
        lr = float(run.optimizer.param_groups[0]["lr"])
        self._steps.append((info.step, info.loss.detach(), lr, info.share.size))
        if info.update is not None:
            self._drain()
            self.write(update_scalars(info.update))
            self.flush()
        elif time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def _drain(self) -> None:
        """Write the buffered steps (one read off the device for all of them)."""
        if not self._steps:
            return
        now = time.perf_counter()
        losses = torch.stack([loss for _, loss, _, _ in self._steps]).float().tolist()
        speed = sum(size for *_, size in self._steps) / max(now - self._window, 1e-9)
        scalars: list[Scalar] = []
        for (step, _, lr, _), loss in zip(self._steps, losses, strict=True):
            scalars += [("train/loss", loss, step), ("train/lr", lr, step)]
        scalars.append(("train/samples_per_second", speed, self._steps[-1][0]))
        self.write(scalars)
        self._steps = []
        self._window = now

    def flush(self) -> None:
        """Write the buffered steps and flush every sink."""
        self._drain()
        self._each("flush")
        self._last_flush = time.monotonic()

    def on_checkpoint(self, run: Run, position: Position) -> None:
        self.flush()

    def on_epoch(
        self, run: Run, metrics: EpochMetrics, position: Position, checkpoint: bool
    ) -> None:
        self._drain()
        step = int(metrics["step"])
        self.write([(f"epoch/{k}", float(v), step) for k, v in metrics.items()])
        self.flush()

    def resized(self, resize: Mapping[str, Any]) -> None:
        """Log a restart on another number of workers."""
        step = int(resize["step"])
        self.write([("run/world_size", float(resize["new_size"]), step)])

    def close(self, checkpoint: str | None) -> None:
        """Flush and close every sink; ``checkpoint``: the run's final checkpoint (None when
        the run did not finish)."""
        self._drain()
        self._each("close", checkpoint)


def watch_hooks(run: Run, settings: RunSettings, start_step: int) -> WatchHooks | None:
    """The watch hooks of ``settings`` for the process that writes the run's checkpoints
    (None when neither TensorBoard nor MLflow is on). A sink that cannot start (e.g. an
    MLflow server that does not answer) is left out with a warning; a missing ``mlflow``
    package is a ``ConfigError``."""
    wanted: list[Callable[[], Any]] = []
    if settings.tensorboard:
        wanted.append(lambda: TensorBoardSink(settings, start_step))
    if settings.mlflow_uri is not None:
        wanted.append(lambda: MlflowSink(settings, run.train))
    sinks: list[Any] = []
    for make in wanted:
        try:
            sinks.append(make())
        except ConfigError:
            raise
        except Exception as exc:  # storage, MLflow server: watching never stops a run
            warnings.warn(f"a run watcher could not start ({exc}); the run goes on", stacklevel=2)
    return WatchHooks(sinks) if sinks else None
