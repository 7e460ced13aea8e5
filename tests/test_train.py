"""GraNet on Ray Train end to end, on 2 CPU workers (gloo): a run through ``fit`` with its
display, checkpoints and plot, and crash-resume that ends bit for bit where the run without
the crash ends."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import pytest
import s3fs
import torch
from fixtures_s3 import S3_TEST_BUCKET
from ray.util.queue import Queue
from rich.console import Console

from granet_ray.config import ConfigError, RunSettings, preset
from granet_ray.events import Started, Stepped
from granet_ray.outcome import FitOutcome, evaluate_checkpoint
from granet_ray.store import SparseCheckpoint, latest_checkpoint, list_checkpoints, load_sparse
from granet_ray.testing.hooks import CrashAt
from granet_ray.testing.seaweedfs import SeaweedFS
from granet_ray.train import build_trainer, fit

# 512 samples / global batch 64 (32 per worker) = 8 global steps per epoch, 24 in all;
# pruning every 2 steps until step 16, regrowth every 2 steps until step 22.
TINY = preset("mnist_demo").replace(
    train_size=512,
    epochs=3,
    global_batch=64,
    lr_milestones=(2,),
    granet={"update_interval": 2, "prune_end": 2},
)
CRASH_STEP = 12  # in epoch 2: the run resumes from the checkpoint of epoch 1 (step 8)


@pytest.fixture(scope="module")
def reference(ray_session: None, seaweedfs: SeaweedFS) -> tuple[FitOutcome, str]:
    """The tiny run without a crash, through ``fit``, stored on S3 (SeaweedFS: a custom
    endpoint), and what its display printed."""
    run = RunSettings(
        num_workers=2,
        storage_path=f"s3://{S3_TEST_BUCKET}/{uuid.uuid4().hex[:12]}",
        storage_options=seaweedfs.storage_options,
        name="reference",
    )
    out = io.StringIO()
    outcome = fit(TINY, run, progress=True, console=Console(file=out, width=200))
    return outcome, out.getvalue()


def test_fit_reports_trains_and_checkpoints_to_s3(
    reference: tuple[FitOutcome, str], seaweedfs: SeaweedFS
) -> None:
    outcome, _ = reference
    m = outcome.metrics
    required = {
        "epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
        "accuracy", "density", "inference_flops", "training_flops", "next_update",
    }  # fmt: skip
    assert required <= set(m)
    assert (m["epoch"], m["step"], m["next_update"]) == (3, 24, -1)
    assert m["accuracy"] == m["val_accuracy"] > 0.5  # 10 classes: far above chance
    assert m["density"] == pytest.approx(0.1, abs=1e-5)
    assert 0 < m["inference_flops"] < m["training_flops"] < 1
    assert [e["epoch"] for e in outcome.epochs] == [1, 2, 3]
    # Every update is recorded: pruning at 2, 4, ..., 16 and regrowth through step 22.
    assert [u["step"] for u in outcome.history] == list(range(2, 24, 2))
    assert outcome.history[7]["target_density"] == pytest.approx(0.1)

    options = seaweedfs.storage_options
    assert outcome.checkpoint_uri == f"{outcome.run_uri}/checkpoint_epoch_0003"
    checkpoint = load_sparse(outcome.checkpoint_uri, storage_options=options)
    assert checkpoint.metadata["step"] == 24
    assert checkpoint.metadata["train"] == json.loads(json.dumps(TINY.to_dict()))
    assert set(checkpoint.masks) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    for name, mask in checkpoint.masks.items():
        assert torch.all(checkpoint.state_dict[name][~mask] == 0)
    assert outcome.checkpoint_bytes > 0
    # Validation accuracy is summed over both workers' halves of the test set: it is the
    # accuracy of the checkpoint's model on the whole test set (1,000 digits) evaluated in
    # one process (another batch size: a logit tie could flip one digit, hence 1e-3).
    accuracy, density = evaluate_checkpoint(outcome.checkpoint_uri, TINY, options)
    assert accuracy == pytest.approx(m["val_accuracy"], abs=1e-3)
    assert density == pytest.approx(m["density"])

    s3 = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    run_dir = outcome.run_uri.removeprefix("s3://")
    assert s3.cat(f"{run_dir}/training.png").startswith(b"\x89PNG")
    saved = json.loads(s3.cat(f"{run_dir}/history.json"))
    assert saved == {"updates": outcome.history, "epochs": outcome.epochs, "resizes": []}
    assert latest_checkpoint(outcome.run_uri, storage_options=options) == outcome.checkpoint_uri
    assert [uri.rsplit("/", 1)[1] for uri in list_checkpoints(outcome.run_uri, options)] == [
        "checkpoint_epoch_0001",
        "checkpoint_epoch_0002",
        "checkpoint_epoch_0003",
    ]


def test_fit_shows_progress_and_summary(reference: tuple[FitOutcome, str]) -> None:
    outcome, shown = reference
    assert "training on 2 worker(s): 3 epochs of 8 steps of 64 samples" in shown
    for epoch in (1, 2, 3):
        assert f"epoch   {epoch} step" in shown
    assert "fc1.weight" in shown and "training FLOPs" in shown  # the per-layer table
    assert outcome.checkpoint_uri in shown and "checkpoint size" in shown


def _same(a: SparseCheckpoint, b: SparseCheckpoint) -> None:
    assert a.state_dict.keys() == b.state_dict.keys()
    for name, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[name]), name
    assert a.masks.keys() == b.masks.keys()
    for name, mask in a.masks.items():
        assert torch.equal(mask, b.masks[name]), name
    assert a.optimizer_state is not None and b.optimizer_state is not None
    for param, state in a.optimizer_state["state"].items():
        for key, value in state.items():
            other = b.optimizer_state["state"][param][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other


def test_crashed_worker_resumes_to_the_same_result(
    reference: tuple[FitOutcome, str], tmp_path: Path, seaweedfs: SeaweedFS
) -> None:
    """Worker 1 dies (os._exit) at step 12; Ray replaces the worker group, which resumes from
    the epoch-1 checkpoint; the final weights, masks and optimizer state equal the
    reference's bit for bit. This run stores on local disk, the reference on S3."""
    marker = tmp_path / "crashed"
    run = RunSettings(num_workers=2, storage_path=str(tmp_path), name="crash", max_failures=1)
    queue = Queue(actor_options={"num_cpus": 0})
    try:
        trainer = build_trainer(
            TINY, run, progress_queue=queue, hooks=[CrashAt(CRASH_STEP, str(marker), rank=1)]
        )
        result = trainer.fit()
        events = [queue.get_nowait() for _ in range(queue.qsize())]
    finally:
        queue.shutdown()
    assert marker.exists()  # the crash happened
    starts = [(e.epoch, e.step) for e in events if isinstance(e, Started)]
    assert starts == [(0, 0), (1, 8)]  # started, then resumed from the epoch-1 checkpoint
    assert result.checkpoint.path == str(tmp_path / "crash" / "checkpoint_epoch_0003")
    crashed = load_sparse(result.checkpoint.path)
    clean = load_sparse(reference[0].checkpoint_uri, storage_options=seaweedfs.storage_options)
    _same(crashed, clean)
    assert crashed.metadata["engine"] == clean.metadata["engine"]
    # Per-epoch metrics too (loss, accuracy, density...), all but the measured throughput.
    assert _without_timing(crashed.metadata["epochs"]) == _without_timing(clean.metadata["epochs"])


def _without_timing(epochs: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "samples_per_second"} for e in epochs]


def test_fit_checks_before_ray_is_needed() -> None:
    with pytest.raises(ConfigError, match="epochs=0 is invalid"):
        fit(preset("mnist_demo").replace(epochs=0), RunSettings())
    with pytest.raises(ConfigError, match="data_root"):
        fit(preset("imagenet_resnet50"), RunSettings())


def test_a_lost_progress_queue_never_fails_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    """Progress is a display: when its queue's actor is gone (its node lost), rank 0 says
    so once and trains on."""
    from ray.exceptions import RayActorError

    from granet_ray.train.worker import QueueSender

    class GoneQueue:
        calls = 0

        def put_nowait(self, event: dict) -> None:
            self.calls += 1
            raise RayActorError()

    queue = GoneQueue()
    send = QueueSender(queue)  # type: ignore[arg-type]
    for step in range(3):
        send(Stepped(epoch=1, step=step, loss=1.0, density=1.0, next_update=None))
    assert queue.calls == 1 and send.lost
    assert capsys.readouterr().out.count("no longer sent to the driver") == 1
