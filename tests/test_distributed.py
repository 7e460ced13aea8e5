"""docs/algorithm.md section 5 with two real gloo processes (no Ray): masks agree bit for bit
after every update although each worker sees different data, and a perturbed mask fails
loudly.

The workers train WITHOUT DDP, so their weights and gradients really differ: only the
score all-reduce of ``DistributedSync`` can make their mask decisions agree. The mask check
is exact: differences that keep every count and every sum of positions (which a hash of
positions summed over a layer can miss) fail too, naming the layer and the step.
"""

from __future__ import annotations

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
    pack_masks,
    sum_across_workers,
)
from granet_ray.sparsity import GraNet
from granet_ray.testing.ports import free_port

STEPS_PER_EPOCH = 10
EPOCHS = 6
PERTURB_AFTER = 25  # a regrow-only update step (pruning ends at step 20)
PERTURBED_LAYER = "3.weight"
SCENARIOS = ("sync", "local", "perturb")
SHIFT_DRAWS = 30
# sorted by name: a 25-element layer (padded to 32 bits) before and an odd one after the conv
CHECK_LAYERS = {"a.weight": (5, 5), "conv.weight": (64, 64, 3, 3), "z.weight": (3, 7)}
ALL_FLAGS = [(True, True), (True, False), (False, True), (False, False)]  # (rank 0, rank 1)


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


def _shift(mask: torch.Tensor, generator: torch.Generator) -> tuple[int, int, int]:
    """Move one active position up by d and another down by d, both onto inactive positions:
    the count and the sum of active positions stay the same. Returns (i, j, d)."""
    flat = mask.view(-1)
    n = flat.numel()
    while True:
        d = int(torch.randint(1, 200, (1,), generator=generator))
        i, j = (int(v) for v in torch.randint(0, n, (2,), generator=generator))
        targets = {i + d, j - d}
        if (
            i != j
            and d <= j
            and i + d < n
            and len(targets) == 2
            and bool(flat[i])
            and bool(flat[j])
            and not any(bool(flat[k]) for k in targets)
        ):
            flat[i], flat[i + d], flat[j], flat[j - d] = False, True, False, True
            return i, j, d


def _check_errors(rank: int) -> dict:
    """``DistributedSync.check`` on identical masks, on SHIFT_DRAWS shifts of one conv layer
    on rank 1 only, and on one flipped padding-adjacent bit: each error message or None."""
    sync = DistributedSync()
    base = {
        n: torch.rand(s, generator=torch.Generator().manual_seed(7)) < 0.3
        for n, s in CHECK_LAYERS.items()
    }

    def check(masks: dict[str, torch.Tensor], step: int) -> str | None:
        try:
            sync.check(masks, step)
        except MaskDivergenceError as err:
            return str(err)
        return None

    results: dict = {"same": check(base, 1), "shifts": [], "moves": []}
    for draw in range(SHIFT_DRAWS):
        masks = {n: m.clone() for n, m in base.items()}
        if rank == 1:
            results["moves"].append(
                _shift(masks["conv.weight"], torch.Generator().manual_seed(draw))
            )
            positions = torch.nonzero(masks["conv.weight"].view(-1)).view(-1)
            original = torch.nonzero(base["conv.weight"].view(-1)).view(-1)
            assert positions.numel() == original.numel()
            assert int(positions.sum()) == int(original.sum())
        results["shifts"].append(check(masks, 100 + draw))
    masks = {n: m.clone() for n, m in base.items()}
    if rank == 0:
        masks["a.weight"].view(-1)[-1] ^= True  # the last bit before the padding
    results["last_bit"] = check(masks, 7)
    return results


def _worker(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: every scenario in turn, then the small collectives."""
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {scenario: _train(rank, scenario) for scenario in SCENARIOS}
        results["sums"] = sum_across_workers([1.5 + rank, 10 * rank, 3])
        results["objects"] = gather_objects({"rank": rank})
        results["checks"] = _check_errors(rank)
        results["all"] = [DistributedSync().all(flags[rank]) for flags in ALL_FLAGS]
        torch.save(results, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The results of both workers (spawned once for all tests of this module)."""
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
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


def test_check_is_exact_for_shifts_that_keep_counts_and_position_sums(
    workers: list[dict],
) -> None:
    """One active weight moved up by d and another down by d on one worker only: counts and
    the sum of positions are unchanged, yet every draw fails on both workers, naming the
    layer, the step and the 4 positions that differ."""
    moves = workers[1]["checks"]["moves"]
    assert len(moves) == SHIFT_DRAWS and len({d for _, _, d in moves}) > 10  # varied shifts
    for result in workers:
        checks = result["checks"]
        assert checks["same"] is None  # identical masks pass
        assert len(checks["shifts"]) == SHIFT_DRAWS
        for draw, error in enumerate(checks["shifts"]):
            assert error is not None, draw
            assert "layer conv.weight " in error and f"step {100 + draw}" in error, error
            assert "differs at 4 of 36864 positions" in error, error
        assert checks["last_bit"] is not None
        assert "layer a.weight " in checks["last_bit"] and "at 1 of 25" in checks["last_bit"]


def test_all_is_true_only_when_every_worker_says_true(workers: list[dict]) -> None:
    for result in workers:
        assert result["all"] == [True, False, False, False]


def test_pack_masks_bits_by_name_each_layer_padded_to_bytes() -> None:
    masks = {
        "b": torch.tensor([True, False, True]),  # padded to 1 byte: 0b10100000
        "a": torch.tensor([[True] * 4, [False, False, False, True]]),  # 0b11110001
        "c": torch.ones(9, dtype=torch.bool),  # 2 bytes: 0xFF, 0b10000000
    }
    packed, sizes = pack_masks(masks)
    assert packed.dtype == torch.uint8 and sizes == [1, 1, 2]
    assert packed.tolist() == [0b11110001, 0b10100000, 0xFF, 0b10000000]
    channels_last = torch.rand(2, 3, 4, 5) < 0.5
    as_last = channels_last.to(memory_format=torch.channels_last)
    assert torch.equal(pack_masks({"x": as_last})[0], pack_masks({"x": channels_last})[0])


def test_sum_and_gather_across_workers(workers: list[dict]) -> None:
    for result in workers:
        assert result["sums"] == [4.0, 10.0, 6.0]
        assert result["objects"] == [{"rank": 0}, {"rank": 1}]


def test_collectives_without_a_process_group_are_local() -> None:
    assert sum_across_workers([1, 2.5]) == [1.0, 2.5]
    assert gather_objects("x") == ["x"]
