"""Elastic GraNet on a real multi-node Ray cluster on this machine (a head and two 1-CPU
worker nodes, the run's storage on the SeaweedFS S3 server as on a cluster whose nodes share
no disk): a run of 2 workers of (1, 2) loses a node, goes on with 1 worker from its last
checkpoint, and grows back to 2 when a node is added. It must end exactly where the
uninterrupted run's schedule ends: every mask update at the same global step, the final
density exact, every sample of every epoch seen once, the accuracy within noise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from elastic_cluster import TRAIN
from fixtures_ray import RAY_ENV

from granet_ray.config import RunSettings
from granet_ray.local import fit_local
from granet_ray.testing.hooks import audit
from granet_ray.testing.seaweedfs import SeaweedFS

# Ray runs in a subprocess (elastic_cluster.py), not through a fixture: marked by hand (the
# seaweedfs fixture marks it s3).
pytestmark = pytest.mark.ray
HERE = Path(__file__).resolve().parent


def test_a_run_that_loses_a_node_goes_on_and_grows_back(
    seaweedfs: SeaweedFS, s3_prefix: str, tmp_path: Path
) -> None:
    reference = fit_local(TRAIN, RunSettings(storage_path=str(tmp_path / "ref")), progress=False)
    env = {
        **os.environ,
        **RAY_ENV,
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20",
        "ELASTIC_STORAGE": s3_prefix,
        "ELASTIC_ENDPOINT": seaweedfs.endpoint_url,
        "ELASTIC_KEY": seaweedfs.access_key,
        "ELASTIC_SECRET": seaweedfs.secret_key,
    }
    work = tmp_path / "elastic"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, str(HERE / "elastic_cluster.py"), str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((work / "outcome.json").read_text())
    assert report["error"] is None, report["error"] + report["shown"][-3000:]

    # It shrank when the node went and grew when it came back, resuming from checkpoints.
    sizes = [(r["old_size"], r["new_size"]) for r in report["resizes"]]
    assert sizes == [(2, 1), (1, 2)], report["resizes"]
    assert [r["step"] for r in report["resizes"]] == [16, 36]  # the checkpoints before pauses
    assert all(r["seconds_lost"] > 0 for r in report["resizes"])
    assert "resized from 2 to 1 worker(s) at step 16" in report["shown"]
    assert "resized from 1 to 2 worker(s) at step 36" in report["shown"]

    # The same schedule as the uninterrupted run: mask updates on the same global steps, the
    # same target densities, and exactly the final density (the exact mask check ran at
    # every update on 2 workers: a difference would have failed the run).
    steps = [(u["due_step"], u["step"], u["target_density"]) for u in report["history"]]
    assert steps == [(u["due_step"], u["step"], u["target_density"]) for u in reference.history]
    final = report["history"][-1]["density"]
    assert final == reference.history[-1]["density"] == report["metrics"]["density"]
    n = sum(math.prod(row["shape"]) for row in reference.summary["layers"] if row["prunable"])
    assert final == math.floor(0.1 * n) / n

    # Every sample of every epoch exactly once, whatever the group size did.
    epochs = audit(str(work / "samples"))
    assert sorted(epochs) == [0, 1, 2, 3]
    for epoch, by_step in epochs.items():
        assert sorted(i for indices in by_step.values() for i in indices) == list(range(512))
        assert sorted(by_step) == list(range(16 * epoch + 1, 16 * epoch + 17)), epoch

    # The accuracy is the uninterrupted run's, within noise (1,000 test digits).
    assert report["metrics"]["accuracy"] == pytest.approx(reference.metrics["accuracy"], abs=0.03)
    assert report["metrics"]["step"] == reference.metrics["step"] == 64
