"""Watching a run (``granet_ray.watch``): TensorBoard event files in the run's folder, read
back with TensorBoard's own reader after an interrupted run resumed (every step once, the
same curves), and an MLflow run in a real local MLflow file store, read back with
``MlflowClient``, continued by the resumed run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import one_thread, tiny_train  # noqa: F401

from granet_ray.config import RunSettings
from granet_ray.events import EpochMetrics
from granet_ray.local import fit_local
from granet_ray.recipe import Hooks, Run, StepInfo
from granet_ray.store import StorageError, open_storage
from granet_ray.watch import MLFLOW_FILE, TensorBoardSink, flat_params

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = {"device": "cpu", "progress": False, "summary": False}


class Interrupt(Hooks):
    """Stops the run (an exception) after global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, run: Run, info: StepInfo) -> None:
        if info.step == self.step:
            raise KeyboardInterrupt


def test_tensorboard_and_mlflow_through_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted in step 6 (its points up to 5 are written), resumed from the checkpoint
    of step 4: TensorBoard shows steps 1..6 once each, with every epoch's metrics and every
    mask update; MLflow holds one run with the params, the epochs' metrics and the final
    checkpoint."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's plain file store
    tracking = f"file:{tmp_path / 'mlruns'}"
    train = tiny_train()
    settings = RunSettings(
        storage_path=str(tmp_path),
        name="watched",
        checkpoint_every_steps=2,
        mlflow_uri=tracking,
        mlflow_experiment="tests",
    )
    with pytest.raises(KeyboardInterrupt):
        fit_local(train, settings, hooks=[Interrupt(6)], **QUIET)
    run_id = json.loads(Path(settings.run_uri, MLFLOW_FILE).read_text())["run_id"]
    outcome = fit_local(train, settings, **QUIET)

    events = EventAccumulator(str(Path(settings.run_uri, "tb")), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in tags:
        steps = Counter(e.step for e in events.Scalars(tag))
        assert all(n == 1 for n in steps.values()), (tag, steps)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3, 4, 5, 6]
    assert "train/samples_per_second" in tags
    assert {f"epoch/{k}" for k in EpochMetrics.__annotations__} <= set(tags)
    accuracy = [(e.step, e.value) for e in events.Scalars("epoch/val_accuracy")]
    assert accuracy == [(m["step"], pytest.approx(m["val_accuracy"])) for m in outcome.epochs]
    updates = [u["step"] for u in outcome.history]
    for tag in ("masks/density", "masks/pruned", "masks/regrown", "masks/postponed_steps"):
        assert [e.step for e in events.Scalars(tag)] == updates
    assert [e.step for e in events.Scalars("layers/fc1.weight/density")] == updates

    client = MlflowClient(tracking)
    [found] = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert found.info.run_id == run_id and found.info.status == "FINISHED"
    assert found.data.tags["checkpoint_uri"] == outcome.checkpoint_uri
    assert found.data.params == flat_params(train)
    assert found.data.params["granet.final_density"] == "0.2"
    history = client.get_metric_history(run_id, "epoch/val_accuracy")
    assert [(m.step, m.value) for m in history] == accuracy
    assert {m.step for m in client.get_metric_history(run_id, "train/loss")} == set(range(1, 7))


def test_no_tensorboard(tmp_path: Path) -> None:
    settings = RunSettings(storage_path=str(tmp_path), name="quiet", tensorboard=False)
    fit_local(tiny_train(epochs=1), settings, **QUIET)
    assert not Path(settings.run_uri, "tb").exists()


def test_tensorboard_on_s3(
    seaweedfs: object, s3_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An S3 run's event files are uploaded into its folder's ``tb/`` through the store,
    a new file started whenever one reached ``ROLL_BYTES`` (small here)."""
    monkeypatch.setattr("granet_ray.watch.ROLL_BYTES", 1000)
    options = seaweedfs.storage_options  # type: ignore[attr-defined]
    settings = RunSettings(storage_path=s3_prefix, storage_options=options, name="s3tb")
    fit_local(tiny_train(epochs=1), settings, **QUIET)
    tb = open_storage(f"{settings.run_uri}/tb", options)
    names = list(tb.list())
    assert len(names) >= 2 and all(n.startswith("events.out.tfevents.") for n in names)
    for name in names:
        (tmp_path / name).write_bytes(tb.get(name) or b"")
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


def test_a_failing_sink_never_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object) -> None:
        raise StorageError("cannot write in tb: disk full")

    monkeypatch.setattr(TensorBoardSink, "flush", broken)
    settings = RunSettings(storage_path=str(tmp_path), name="broken")
    with pytest.warns(UserWarning, match="TensorBoardSink stopped .*disk full.*run goes on"):
        outcome = fit_local(tiny_train(epochs=1), settings, **QUIET)
    assert outcome.metrics["epoch"] == 1


def test_an_mlflow_store_that_fails_at_start_never_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the store's folder should be")
    settings = RunSettings(
        storage_path=str(tmp_path), name="nomlflow", tensorboard=False, mlflow_uri=f"file:{blocked}"
    )
    with pytest.warns(UserWarning, match="a run watcher could not start .*the run goes on"):
        outcome = fit_local(tiny_train(epochs=1), settings, **QUIET)
    assert outcome.metrics["epoch"] == 1
