"""The elastic scenario of tests/test_elastic.py, run in a process of its own (a Ray cluster
of a head and two 1-CPU worker nodes on this machine; nodes must be added and removed from
the main thread). Usage: python elastic_cluster.py WORK_DIR; the run's storage comes from
$ELASTIC_STORAGE, $ELASTIC_ENDPOINT, $ELASTIC_KEY, $ELASTIC_SECRET; the outcome is written
to WORK_DIR/outcome.json.

The run (2 workers of (1, 2), checkpoints every 4 steps) pauses after step 20: a node is
removed, the run goes on with 1 worker from its last checkpoint; it pauses again after step
40 (on 1 worker): a node is added, the run grows back to 2 workers and ends."""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster
from rich.console import Console

from granet_ray.config import RunSettings, preset
from granet_ray.testing.hooks import PauseAt, SampleLog
from granet_ray.train import fit

TRAIN = preset("mnist_demo").replace(
    train_size=512,
    epochs=4,
    global_batch=32,
    lr_milestones=(3,),
    granet={"update_interval": 4, "prune_end": 2},
)  # 16 global steps per epoch, 64 in all; pruning every 4 steps until 32, regrowth to 60


def wait_for(path: Path, content: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text() == content):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not hold {content!r} within {timeout} s")
        time.sleep(0.2)


def main(work: Path) -> None:
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20) for _ in range(2)]
    ray.init(address=cluster.address)
    options = {
        "endpoint_url": os.environ["ELASTIC_ENDPOINT"],
        "key": os.environ["ELASTIC_KEY"],
        "secret": os.environ["ELASTIC_SECRET"],
    }
    run = RunSettings(
        num_workers=2,
        min_workers=1,
        resize_interval=5,
        storage_path=os.environ["ELASTIC_STORAGE"],
        storage_options=options,
        name="elastic",
        checkpoint_every_steps=4,
        max_failures=6,
    )
    first, second = (
        PauseAt(20, str(work / "r1"), str(work / "go1")),
        PauseAt(40, str(work / "r2"), str(work / "go2")),
    )
    hooks = [SampleLog(str(work / "samples")), first, second]
    shown = io.StringIO()
    result: dict[str, Any] = {}

    def train() -> None:
        try:
            result["outcome"] = fit(TRAIN, run, console=Console(file=shown, width=200), hooks=hooks)
        except BaseException as err:  # reported to the test
            result["error"] = repr(err)

    thread = threading.Thread(target=train)
    marks = {"start": time.monotonic()}
    thread.start()
    wait_for(Path(first.reached), "2")  # 2 workers paused after step 20
    marks["remove"] = time.monotonic()
    cluster.remove_node(nodes[1])
    wait_for(Path(first.reached), "1")  # the smaller group got there again
    marks["running_on_1"] = time.monotonic()
    Path(first.release).touch()
    wait_for(Path(second.reached), "1")  # 1 worker paused after step 40
    marks["add"] = time.monotonic()
    cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20)
    wait_for(Path(second.reached), "2")  # regrown to 2 workers, back at step 40
    marks["running_on_2"] = time.monotonic()
    Path(second.release).touch()
    thread.join(timeout=300)
    marks["end"] = time.monotonic()
    outcome = result.get("outcome")
    report = {
        "error": result.get("error"),
        "shown": shown.getvalue(),
        "marks": marks,
        "train": TRAIN.to_dict(),
    }
    if outcome is not None:
        report.update(
            metrics=outcome.metrics,
            history=outcome.history,
            resizes=outcome.resizes,
            epochs=outcome.epochs,
            checkpoint_uri=outcome.checkpoint_uri,
        )
    (work / "outcome.json").write_text(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
