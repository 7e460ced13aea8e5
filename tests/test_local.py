"""A run in this process (``granet-ray train``): the recipe end to end on MNIST-5k at 90%
sparsity, its checkpoints and outcome, and resuming an interrupted run exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from granet_ray.config import RunSettings, preset
from granet_ray.local import fit_local
from granet_ray.recipe import Hooks, Run, StepInfo
from granet_ray.store import list_checkpoints, load_sparse


@pytest.mark.slow
def test_granet_reaches_high_accuracy_at_90_percent_sparsity_on_mnist5k(tmp_path: Path) -> None:
    train = preset("mnist_demo")  # granet, ERK d_i = 0.5 -> d_f = 0.1, 8 epochs
    console = Console(record=True, width=160)
    run = RunSettings(storage_path=str(tmp_path), name="demo", checkpoint_every=4)
    outcome = fit_local(train, run, device="cpu", console=console)
    assert outcome.metrics["accuracy"] >= 0.96, f"test accuracy {outcome.metrics['accuracy']}"
    assert outcome.metrics["step"] == 8 * 31  # 4000 samples, global batch 128
    checkpoint = load_sparse(outcome.checkpoint_uri)
    total = sum(m.numel() for m in checkpoint.masks.values())
    assert sum(int(m.sum()) for m in checkpoint.masks.values()) == math.floor(0.1 * total + 1e-9)
    assert outcome.summary["inference_flops"] < 0.5
    assert 0.1 < outcome.summary["training_flops"] < 0.6
    assert [Path(u).name for u in list_checkpoints(outcome.run_uri)] == [
        "checkpoint_epoch_0004",
        "checkpoint_epoch_0008",
    ]
    saved = json.loads((tmp_path / "demo" / "history.json").read_text())
    assert saved["updates"] == outcome.history and len(saved["epochs"]) == 8
    assert (tmp_path / "demo" / "training.png").read_bytes().startswith(b"\x89PNG")
    shown = console.export_text()
    assert "training on 1 worker(s): 8 epochs of 31 steps of 128 samples" in shown
    assert "fc1.weight" in shown and "checkpoint size" in shown


class Interrupt(Hooks):
    """Stops the run (an exception, as a killed process would) after global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, run: Run, info: StepInfo) -> None:
        if info.step == self.step:
            raise KeyboardInterrupt


TINY = preset("mnist_demo").replace(
    train_size=512,
    epochs=3,
    global_batch=64,
    lr_milestones=(2,),
    granet={"update_interval": 2, "prune_end": 2},
)


@pytest.mark.parametrize("every_steps", [None, 5])
def test_an_interrupted_run_resumes_to_the_same_result(
    tmp_path: Path, every_steps: int | None
) -> None:
    """Stopped at step 13 (epoch 2), the same command resumes from the newest checkpoint:
    epoch 1's (step 8), or the mid-epoch one of step 10; it ends bit for bit where the
    uninterrupted run ends."""
    quiet = {"device": "cpu", "progress": False}
    clean = fit_local(TINY, RunSettings(storage_path=str(tmp_path), name="clean"), **quiet)
    run = RunSettings(storage_path=str(tmp_path), name="cut", checkpoint_every_steps=every_steps)
    with pytest.raises(KeyboardInterrupt):
        fit_local(TINY, run, hooks=[Interrupt(13)], **quiet)
    names = [Path(u).name for u in list_checkpoints(run.run_uri)]
    expected = ["checkpoint_epoch_0001"]
    if every_steps:
        expected = ["checkpoint_epoch_0000_step_0005", *expected, "checkpoint_epoch_0001_step_0002"]
    assert names == expected
    resumed = fit_local(TINY, run, **quiet)
    a, b = load_sparse(resumed.checkpoint_uri), load_sparse(clean.checkpoint_uri)
    for name, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[name]), name
    assert a.metadata["engine"] == b.metadata["engine"]
    drop = ("samples_per_second",)
    epochs = [
        [{k: v for k, v in e.items() if k not in drop} for e in o.epochs] for o in (resumed, clean)
    ]
    assert epochs[0] == epochs[1]
