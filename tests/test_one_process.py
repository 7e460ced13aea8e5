"""A run in one process never registers the sparse all-reduce hook, where it could save
nothing: without a process group ``fit_local`` does not wrap the model in DDP (and a Ray Train
run on one worker is not wrapped either: ``prepare_model`` wraps from 2 workers on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny import one_thread, tiny_train  # noqa: F401

from granet_ray.config import RunSettings
from granet_ray.local import fit_local
from granet_ray.recipe import Hooks, Run, StepInfo, build_run

pytestmark = pytest.mark.usefixtures("one_thread")


class Capture(Hooks):
    """Keeps the run it is called with."""

    run: Run | None = None

    def on_step(self, run: Run, info: StepInfo) -> None:
        self.run = run


def test_no_sparse_allreduce_hook_in_one_process(tmp_path: Path) -> None:
    train = tiny_train(epochs=1, sparse_allreduce=True)
    assert build_run(train, device=torch.device("cpu")).allreduce is None
    capture = Capture()
    settings = RunSettings(storage_path=str(tmp_path), name="one", tensorboard=False)
    fit_local(train, settings, device="cpu", progress=False, summary=False, hooks=[capture])
    assert capture.run is not None and capture.run.allreduce is None
    assert not isinstance(capture.run.model, torch.nn.parallel.DistributedDataParallel)


def test_no_sparse_allreduce_hook_in_a_one_process_ddp_group(tmp_path: Path) -> None:
    """A DDP group of one process (``fit_local`` under an initialized group, e.g. one GPU
    with NCCL) has nothing to send: the recipe leaves the hook out."""
    import torch.distributed as dist

    from granet_ray.distributed import DistributedSync

    train = tiny_train(epochs=1, sparse_allreduce=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel
        run = build_run(train, device=torch.device("cpu"), wrap=ddp, sync=DistributedSync())
        assert isinstance(run.model, ddp) and run.allreduce is None
    finally:
        dist.destroy_process_group()
