"""Spec section 5 with two real gloo processes (no Ray): masks agree bit for bit after every
update although each worker sees different data, and a perturbed mask fails loudly.

The workers train WITHOUT DDP, so their weights and gradients really differ: only the
score all-reduce of ``DistributedSync`` can make their mask decisions agree.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from granet_ray.config import GraNetConfig
from granet_ray.distributed import (
    DistributedSync,
    MaskDivergenceError,
    gather_objects,
    sum_across_workers,
)
from granet_ray.sparsity import GraNet

STEPS_PER_EPOCH = 10
EPOCHS = 6
PERTURB_AFTER = 25  # a regrow-only update step (pruning ends at step 20)
PERTURBED_LAYER = "3.weight"
SCENARIOS = ("sync", "local", "perturb")


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every worker
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def _train(rank: int, scenario: str) -> dict:
    """60 steps on rank-specific random data; the masks after every update, the error
    raised (if any) and the final weights."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    config = GraNetConfig(
        method="granet",
        init_density=0.8,
        final_density=0.2,
        update_interval=5,
        prune_start=0,
        prune_end=2,
    )
    engine = GraNet(
        model,
        optimizer,
        config,
        total_steps=STEPS_PER_EPOCH * EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        sync=None if scenario == "local" else DistributedSync(),
    )
    data = torch.Generator().manual_seed(100 + rank)  # different data on every worker
    masks_after: dict[int, dict[str, torch.Tensor]] = {}
    error = None
    for _ in range(STEPS_PER_EPOCH * EPOCHS):
        inputs = torch.randn(16, 1, 8, 8, generator=data)
        targets = torch.randint(0, 3, (16,), generator=data)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        try:
            update = engine.step()
        except MaskDivergenceError as err:
            error = str(err)
            break
        if update is not None:
            masks_after[update["step"]] = {n: m.clone() for n, m in engine.masks.items()}
        if scenario == "perturb" and rank == 1 and engine.step_count == PERTURB_AFTER:
            state = engine.state_dict()
            state["masks"][PERTURBED_LAYER].view(-1)[0] ^= True
            engine.load_state_dict(state)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"masks": masks_after, "error": error, "weights": weights}


def _worker(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: every scenario in turn, then the small collectives."""
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {scenario: _train(rank, scenario) for scenario in SCENARIOS}
        results["sums"] = sum_across_workers([1.5 + rank, 10 * rank, 3])
        results["objects"] = gather_objects({"rank": rank})
        torch.save(results, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The results of both workers (spawned once for all tests of this module)."""
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"{rank}.pt") for rank in range(2)]


def test_masks_identical_on_both_workers_after_every_update(workers: list[dict]) -> None:
    first, second = (w["sync"] for w in workers)
    assert first["error"] is None and second["error"] is None
    steps = sorted(first["masks"])
    assert steps == list(range(5, STEPS_PER_EPOCH * EPOCHS, 5))  # 11 updates, every dT
    assert steps == sorted(second["masks"])
    for step in steps:
        for name, mask in first["masks"][step].items():
            assert torch.equal(mask, second["masks"][step][name]), (step, name)
    # The workers' weights differ (different data, no DDP): agreement came from the sync.
    assert not torch.equal(first["weights"]["3.weight"], second["weights"]["3.weight"])
    # ... and the masks did change over time: pruning to 0.2, and regrowth moved weights.
    final = first["masks"][steps[-1]]
    density = sum(int(m.sum()) for m in final.values()) / sum(m.numel() for m in final.values())
    assert density == pytest.approx(0.2, abs=1e-3)
    assert not torch.equal(first["masks"][25]["3.weight"], first["masks"][30]["3.weight"])


def test_without_the_score_all_reduce_masks_diverge(workers: list[dict]) -> None:
    """The control: the same run with a local (non-averaging) sync ends with different
    masks, so the identical masks above are the all-reduce's doing."""
    first, second = (w["local"] for w in workers)
    last = max(first["masks"])
    assert any(
        not torch.equal(mask, second["masks"][last][name])
        for name, mask in first["masks"][last].items()
    )


def test_perturbed_mask_on_one_worker_fails_naming_layer_and_step(workers: list[dict]) -> None:
    first, second = (w["perturb"] for w in workers)
    for result in (first, second):  # every worker raises: none goes on silently
        assert result["error"] is not None
        assert f"layer {PERTURBED_LAYER}" in result["error"]
        assert "step 30" in result["error"]
    assert max(first["masks"]) == PERTURB_AFTER  # the failing update recorded nothing


def test_sum_and_gather_across_workers(workers: list[dict]) -> None:
    for result in workers:
        assert result["sums"] == [4.0, 10.0, 6.0]
        assert result["objects"] == [{"rank": 0}, {"rank": 1}]


def test_collectives_without_a_process_group_are_local() -> None:
    assert sum_across_workers([1, 2.5]) == [1.0, 2.5]
    assert gather_objects("x") == ["x"]
