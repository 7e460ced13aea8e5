"""A Ray Train run that cleans up after itself and can be watched: the driver holds the
run's lease while a worker group crashes and is replaced, rank 0 keeps the newest checkpoint
plus the best one after every save, writes TensorBoard events once per step across the
restart, and Ray's own bookkeeping never makes a resume look for a deleted checkpoint (the
same run started again concludes from what is left)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import Counter
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import tiny_train

from granet_ray.config import RunSettings
from granet_ray.local import fit_local
from granet_ray.store import list_checkpoints
from granet_ray.store.lease import LEASE_NAME, LeaseHeldError, RunLease
from granet_ray.testing.hooks import CrashAt
from granet_ray.train import fit
from granet_ray.train.trainer import RAY_SNAPSHOT, forget_deleted_checkpoints


def watch_lease(run_uri: str, seen: list[int], stop: threading.Event) -> None:
    """Record the pid in the run's lease, polled while the run trains."""
    lease = Path(run_uri, LEASE_NAME)
    while not stop.wait(0.05):
        with contextlib.suppress(FileNotFoundError, ValueError):
            seen.append(json.loads(lease.read_text())["pid"])


def test_a_ray_run_with_retention_lease_and_tensorboard(ray_session: None, tmp_path: Path) -> None:
    settings = RunSettings(
        storage_path=str(tmp_path / "runs"),
        name="long",
        checkpoint_every_steps=2,
        keep_checkpoints=1,
        keep_best="val_accuracy",
        max_failures=1,
    )
    seen: list[int] = []
    stop = threading.Event()
    spy = threading.Thread(target=watch_lease, args=(settings.run_uri, seen, stop))
    spy.start()
    try:
        hooks = [CrashAt(5, str(tmp_path / "crashed"))]
        outcome = fit(tiny_train(), settings, progress=False, summary=False, hooks=hooks)
    finally:
        stop.set()
        spy.join()
    assert (tmp_path / "crashed").exists() and outcome.metrics["epoch"] == 2
    assert seen and set(seen) == {os.getpid()}  # the driver held it throughout
    assert not Path(settings.run_uri, LEASE_NAME).exists()
    left = [Path(u).name for u in list_checkpoints(settings.run_uri)]
    assert 1 <= len(left) <= 2 and left[-1] == "checkpoint_epoch_0002"
    events = EventAccumulator(str(Path(settings.run_uri, "tb")), size_guidance={"scalars": 0})
    events.Reload()
    steps = Counter(e.step for e in events.Scalars("train/loss"))
    assert sorted(steps) == [1, 2, 3, 4, 5, 6] and set(steps.values()) == {1}
    again = fit(tiny_train(), settings, progress=False, summary=False)
    assert again.checkpoint_uri == outcome.checkpoint_uri


def test_fit_is_refused_while_another_run_holds_the_name(ray_session: None, tmp_path: Path) -> None:
    settings = RunSettings(storage_path=str(tmp_path), name="busy")
    with RunLease(settings.run_uri, renew_s=5) as holder:
        with pytest.raises(LeaseHeldError, match=f"pid {os.getpid()}, running for"):
            fit(tiny_train(), settings, progress=False, summary=False)
        assert not holder.lost
    assert list_checkpoints(settings.run_uri) == []


def test_rays_record_forgets_deleted_checkpoints(tmp_path: Path) -> None:
    """Entries of deleted checkpoints leave Ray's record, the others stay as they were; an
    unreadable record is removed."""
    settings = RunSettings(storage_path=str(tmp_path), name="rec", tensorboard=False)
    fit_local(tiny_train(), settings, device="cpu", progress=False, summary=False)
    names = ["checkpoint_epoch_0000_step_0002", "checkpoint_epoch_0001", "checkpoint_epoch_0002"]
    entry = [
        {"version": 0, "checkpoint_dir_name": n, "metrics": {"epoch": i}}
        for i, n in enumerate(names)
    ]
    record = {
        "ray_version": "x",
        "checkpoint_results": entry,
        "checkpoint_report_indices": [0, 1, 2],
        "latest_checkpoint_result": entry[2],
        "pending_training_results": [entry[0]],
        "pending_validation_specs": [False],
        "current_report_index": 3,
    }
    snapshot = Path(settings.run_uri, RAY_SNAPSHOT)
    snapshot.write_text(json.dumps(record))
    assert forget_deleted_checkpoints(settings) == [names[0]]  # never saved here
    kept = json.loads(snapshot.read_text())
    assert kept["checkpoint_results"] == entry[1:]
    assert kept["checkpoint_report_indices"] == [1, 2]
    assert kept["latest_checkpoint_result"] == entry[2]
    assert kept["pending_training_results"] == kept["pending_validation_specs"] == []
    assert kept["current_report_index"] == 3
    assert forget_deleted_checkpoints(settings) == []
    snapshot.write_text("{not json")
    assert forget_deleted_checkpoints(settings) == [RAY_SNAPSHOT]
    assert not snapshot.exists()
