"""One writer per run (``granet_ray.store.lease``): a second run of a name is refused at
start with one line naming the holder and its age while the first goes on unharmed; a
lease whose holder died (killed, or silent for its expiry) is taken over, so a resume after
a crash is not blocked; local disk and S3 alike."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fixtures_s3 import StorageRoot, storage_root  # noqa: F401
from tiny import one_thread, tiny_train  # noqa: F401

from granet_ray.cli import main
from granet_ray.config import RunSettings
from granet_ray.local import fit_local
from granet_ray.store import list_checkpoints, open_storage
from granet_ray.store.lease import LEASE_NAME, LeaseHeldError, RunLease, read_holder
from granet_ray.testing.hooks import PauseAt

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = {"device": "cpu", "progress": False, "summary": False}
REPO = Path(__file__).resolve().parents[1]


def test_a_lease_refuses_a_second_holder_and_expires(storage_root: StorageRoot) -> None:  # noqa: F811
    uri, options = storage_root.uri("run"), storage_root.options
    first = RunLease(uri, options, renew_s=0.2, settle_s=0.05).acquire()
    try:
        with pytest.raises(LeaseHeldError, match=r"in use by another run \(.* pid \d+, running"):
            RunLease(uri, options, renew_s=0.2, settle_s=0.05).acquire()
        storage = open_storage(uri, options)
        before = read_holder(storage)
        time.sleep(0.5)
        after = read_holder(storage)
        assert before is not None and after is not None and after.renewed > before.renewed
    finally:
        first.release()
    assert open_storage(uri, options).get(LEASE_NAME) is None
    # a holder on another host that stopped renewing: expired after 3 periods, taken over
    stale = {
        "id": "0" * 16,
        "host": "elsewhere",
        "pid": 1,
        "started": time.time() - 100,
        "renewed": time.time() - 10,
        "renew_s": 3.0,
    }
    storage.put(LEASE_NAME, json.dumps(stale).encode())
    with RunLease(uri, options, renew_s=5, settle_s=0.05) as taken:
        holder = read_holder(storage)
        assert holder is not None and holder.id == taken.holder.id
    stale["renewed"] = time.time()
    storage.put(LEASE_NAME, json.dumps(stale).encode())
    with pytest.raises(LeaseHeldError, match="elsewhere pid 1, running for 1m4"):
        RunLease(uri, options).acquire()
    # a live lease of a process of this host that is gone: taken over at once, unless it
    # ran in another PID namespace (another container with this host name)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    here = RunLease(uri, options).holder.pid_ns
    dead = {**stale, "host": socket.gethostname(), "pid": int(gone.stdout), "pid_ns": "pid:[1]"}
    storage.put(LEASE_NAME, json.dumps(dead).encode())
    with pytest.raises(LeaseHeldError, match=f"pid {int(gone.stdout)}"):
        RunLease(uri, options).acquire()
    storage.put(LEASE_NAME, json.dumps({**dead, "pid_ns": here}).encode())
    RunLease(uri, options, settle_s=0.05).acquire().release()


def test_two_runs_of_one_name_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The first run is paused at step 2 while the same name is started again, in process
    and from the command line: both are refused before training (exit 2, one error line
    naming the holder); the first run then finishes with all its checkpoints."""
    settings = RunSettings(storage_path=str(tmp_path), name="same", tensorboard=False)
    reached, release = tmp_path / "reached", tmp_path / "release"
    outcome: dict[str, object] = {}

    def first() -> None:
        hooks = [PauseAt(2, str(reached), str(release), timeout_s=120)]
        outcome["first"] = fit_local(tiny_train(), settings, hooks=hooks, **QUIET)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not reached.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reached.exists()
        with pytest.raises(LeaseHeldError, match=f"pid {os.getpid()}, running for"):
            fit_local(tiny_train(), settings, **QUIET)
        code = main(
            ["train", "--storage", str(tmp_path), "--name", "same", "--no-progress"]
            + ["--device", "cpu"]
        )
        err = capsys.readouterr().err
        assert code == 2
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: run folder ")
        assert f"{socket.gethostname()} pid {os.getpid()}" in lines[0]
    finally:
        release.touch()
        thread.join()
    first_outcome = outcome["first"]
    assert first_outcome.metrics["epoch"] == 2  # type: ignore[attr-defined]
    assert [Path(u).name for u in list_checkpoints(settings.run_uri)] == [
        "checkpoint_epoch_0001",
        "checkpoint_epoch_0002",
    ]
    assert not Path(settings.run_uri, LEASE_NAME).exists()


KILLED = """
import sys, torch
sys.path.insert(0, "tests")
torch.set_num_threads(1)
from tiny import tiny_train
from granet_ray.config import RunSettings
from granet_ray.local import fit_local
from granet_ray.testing.hooks import CrashAt
settings = RunSettings(storage_path=sys.argv[1], name="crash", tensorboard=False)
fit_local(tiny_train(), settings, device="cpu", progress=False, summary=False,
          hooks=[CrashAt(4, sys.argv[2])])
"""


def test_a_resume_after_the_holder_was_killed(tmp_path: Path) -> None:
    """A run that dies abruptly at step 4 leaves its lease; the next start of the name sees
    a holder process of this host that is gone and resumes at once."""
    done = subprocess.run(
        [sys.executable, "-c", KILLED, str(tmp_path), str(tmp_path / "crashed")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    settings = RunSettings(storage_path=str(tmp_path), name="crash", tensorboard=False)
    left = read_holder(open_storage(settings.run_uri))
    assert left is not None and left.host == socket.gethostname()
    outcome = fit_local(tiny_train(), settings, **QUIET)
    assert outcome.metrics["epoch"] == 2
