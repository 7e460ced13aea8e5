"""The sparse gradient all-reduce (``distributed.SparseAllReduce``) on 2 real gloo processes: a
whole GraNet run through ``recipe.build_run`` with the hook is bit for bit the run without it
(weights, optimizer state, masks, statistics), dense-to-sparse and sparse-to-sparse; its
gradients are plain DDP's on every entry that travels, 0 on the others between mask updates
and dense at update steps; a postponed update still reads dense gradients; a non-finite
gradient of an inactive weight still makes the GradScaler skip the step; bf16 compression is
DDP's ``bf16_compress_hook`` on every travelling entry. Plus the packing positions and the
byte count without a process group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from processes import gloo_workers
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from granet_ray.config import GraNetConfig, TrainConfig
from granet_ray.distributed import (
    DistributedSync,
    SparseAllReduce,
    packed_offsets,
    register_sparse_allreduce,
)
from granet_ray.recipe import Run, Sums, build_run, train_steps

CPU = torch.device("cpu")
# MNIST conv net on 96 synthetic samples: 3 epochs of 6 global steps of 16 (8 per worker),
# a mask update every 3 steps from prune_start on (each regrows by gradient; the last at 15).
DENSE_TO_SPARSE = TrainConfig(
    model="mnist_convnet",
    dataset="synthetic_mnist5k",
    train_size=96,
    epochs=3,
    global_batch=16,
    lr=0.05,
    lr_milestones=(),
    weight_decay=5e-4,
    precision="fp32",
    channels_last=False,
    sparse_allreduce=False,
    # dense-to-sparse: updates from step 6, all masks ones until the update at step 9 prunes
    # (steps 9 and 12, to 0.2)
    granet=GraNetConfig(
        init_density=1.0, final_density=0.2, update_interval=3, prune_start=1, prune_end=2
    ),
)
# sparse-to-sparse from ERK 0.5, accumulating over micro-batches of 3 (3 + 3 + 2 per worker)
SPARSE_TO_SPARSE = DENSE_TO_SPARSE.replace(
    max_batch_per_worker=3,
    granet=GraNetConfig(
        init_density=0.5, final_density=0.2, update_interval=3, prune_start=0, prune_end=2
    ),
)
UPDATES = {"d2s": [6, 9, 12, 15], "s2s": [3, 6, 9, 12, 15]}  # regrowth at each
FP16 = SPARSE_TO_SPARSE.replace(precision="fp16", max_batch_per_worker=None)
POSTPONED = 6  # an update step whose gradients overflow: the update runs at step 7
INACTIVE_INF = 8  # a step between updates: rank 1 sets one inactive gradient entry to inf
SMALL_BUCKETS = 0.05  # MB: one bucket at the first step, 3 after DDP rebuilds them


def _ddp(bucket_cap_mb: float = 25.0) -> Callable[[nn.Module], nn.Module]:
    return lambda net: DDP(net, bucket_cap_mb=bucket_cap_mb)


def _trace(run: Run, before: Callable[[Run], None] | None = None) -> dict[str, Any]:
    """Train every epoch of ``run``. Recorded at every optimizer step (after the gradient
    all-reduce, before the weights move): whether the engine reads dense gradients there,
    the masks the gradients travelled with and the gradients; at every bucket the hook
    all-reduces: the step, its parameters' names and the bytes sent. Then the final weights,
    optimizer state, masks and statistics. ``before(run)`` runs before every step."""
    engine = run.engine
    names = {id(p): n for n, p in run.net.named_parameters()}
    out: dict[str, Any] = {"steps": {}, "grads": {}, "masks": {}, "buckets": [], "scales": []}
    state = run.allreduce
    if state is not None:
        all_reduce = state.all_reduce

        def logged(bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            step, sent = engine.step_count + 1, state.bytes_sent
            future = all_reduce(bucket)
            params = tuple(names[id(p)] for p in bucket.parameters())
            dense = engine.reads_gradients(step)
            out["buckets"].append((step, dense, params, state.bytes_sent - sent))
            if step not in out["masks"]:
                out["masks"][step] = {n: m.clone() for n, m in engine.masks.items()}
            return future

        state.all_reduce = logged  # type: ignore[method-assign]

    def record(*_: Any) -> None:
        step = engine.step_count + 1
        out["steps"][step] = engine.reads_gradients(step)
        if step not in out["masks"]:
            out["masks"][step] = {n: m.clone() for n, m in engine.masks.items()}
        out["grads"][step] = {n: p.grad.clone() for n, p in run.net.named_parameters()}

    run.optimizer.register_step_pre_hook(record)
    for epoch in range(run.train.epochs):
        steps = train_steps(run, epoch, Sums.zeros(CPU))
        while True:
            if before is not None:
                before(run)
            if next(steps, None) is None:
                break
            if run.scaler is not None:
                out["scales"].append(run.scaler.get_scale())
    out["weights"] = {n: t.clone() for n, t in run.net.state_dict().items()}
    out["optimizer"] = {
        names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in run.optimizer.state.items()
    }
    out["final_masks"] = {n: m.clone() for n, m in engine.masks.items()}
    out["history"] = engine.history
    out["numel"] = {n: p.numel() for n, p in run.net.named_parameters()}
    out["bytes"] = None if state is None else (state.bytes_sent, state.bytes_dense)
    return out


def _set_scale(run: Run, scale: float) -> None:
    run.scaler.load_state_dict({**run.scaler.state_dict(), "scale": scale})


def _postpone(run: Run) -> None:
    """Overflow the fp16 gradients of step ``POSTPONED`` (a GradScaler scale of 2^60), then
    go on at a scale of 2^8."""
    if run.engine.step_count + 1 == POSTPONED:
        _set_scale(run, 2.0**60)
    elif run.engine.step_count in (0, POSTPONED):
        _set_scale(run, 2.0**8)


def _inactive_inf(rank: int) -> Callable[[Run], None]:
    """At step ``INACTIVE_INF`` on rank 1 only, one inactive entry of fc1's gradient is inf."""
    hooked: list[Run] = []  # the runs whose fc1 weight has the hook (kept: no id reuse)

    def before(run: Run) -> None:
        if run.engine.step_count == 0:
            _set_scale(run, 2.0**8)
        if rank != 1 or any(r is run for r in hooked):
            return
        weight = run.engine.params["fc1.weight"]

        def poison(grad: torch.Tensor) -> torch.Tensor:
            if run.engine.step_count + 1 != INACTIVE_INF:
                return grad
            inactive = torch.nonzero(~run.engine.masks["fc1.weight"].view(-1))[0]
            grad = grad.clone()
            grad.view(-1)[inactive] = torch.inf
            return grad

        weight.register_hook(poison)
        hooked.append(run)

    return before


def _pair(
    rank: int,
    train: TrainConfig,
    wrap: Callable[[nn.Module], nn.Module],
    before: Callable[[Run], None] | None = None,
    channels_last: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run of ``train`` without, then with the sparse all-reduce."""
    traces = []
    for on in (False, True):
        run = build_run(
            train.replace(sparse_allreduce=on),
            device=CPU,
            rank=rank,
            world=2,
            wrap=wrap,
            sync=DistributedSync(),
            channels_last=channels_last,
        )
        assert isinstance(run.model, DDP) and (run.allreduce is not None) == on
        traces.append(_trace(run, before))
    return traces[0], traces[1]


def _bf16(rank: int) -> dict[str, Any]:
    """The sparse-to-sparse run with DDP's bf16_compress_hook, and with the sparse hook
    compressing to bf16."""
    traces = {}
    for name in ("ddp_bf16", "sparse_bf16"):
        run = build_run(
            SPARSE_TO_SPARSE,
            device=CPU,
            rank=rank,
            world=2,
            wrap=_ddp(SMALL_BUCKETS),
            sync=DistributedSync(),
        )
        if name == "ddp_bf16":
            run.model.register_comm_hook(None, bf16_compress_hook)
        else:
            run.allreduce = register_sparse_allreduce(run.model, run.engine, torch.bfloat16)
        traces[name] = _trace(run)
    return traces


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results = {
            "d2s": _pair(rank, DENSE_TO_SPARSE, _ddp()),
            "s2s": _pair(rank, SPARSE_TO_SPARSE, _ddp(SMALL_BUCKETS), channels_last=True),
            "postponed": _pair(rank, FP16, _ddp(), _postpone),
            "inactive_inf": _pair(rank, FP16, _ddp(SMALL_BUCKETS), _inactive_inf(rank)),
            **_bf16(rank),
        }
        torch.save(results, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both workers' traces of every scenario (one fork-server start for the module); about
    50 s on the 2-core machine, so the tests that use it are marked slow."""
    out = tmp_path_factory.mktemp("allreduce")
    return gloo_workers(_worker, 2, out)


def _assert_same(a: Any, b: Any, where: str) -> None:
    """Nested dicts / lists of tensors and numbers equal exactly (tensors by torch.equal)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


def _assert_runs_identical(plain: dict[str, Any], sparse: dict[str, Any], where: str) -> None:
    for key in ("steps", "weights", "optimizer", "final_masks", "history", "scales"):
        _assert_same(plain[key], sparse[key], f"{where}:{key}")
    for step, masks in plain["masks"].items():
        _assert_same(masks, sparse["masks"][step], f"{where}:masks at {step}")


def _assert_gradients(plain: dict[str, Any], sparse: dict[str, Any], where: str) -> set[bool]:
    """The sparse run's gradients at every optimizer step: plain DDP's where they travel (all
    of them at dense steps and for parameters without a mask), exactly 0 elsewhere. Returns
    the kinds of step there were (dense: True, packed: False)."""
    for step, dense in sparse["steps"].items():
        masks = sparse["masks"][step]
        for name, grad in plain["grads"][step].items():
            got = sparse["grads"][step][name]
            if dense or name not in masks:
                assert torch.equal(got, grad), (where, step, name)
                continue
            mask = masks[name]
            assert torch.equal(got[mask], grad[mask]), (where, step, name)
            assert bool((got[~mask] == 0).all()), (where, step, name)
        if not dense and not all(bool(m.all()) for m in masks.values()):
            # plain DDP did send non-zero gradients of inactive weights: the hook dropped them
            grads = plain["grads"][step]
            assert any(bool((grads[n][~m] != 0).any()) for n, m in masks.items()), (where, step)
    return set(sparse["steps"].values())


def _bucket_bytes(
    trace: dict[str, Any], step: int, dense: bool, params: tuple[str, ...], size: int
) -> int:
    """What one bucket costs at ``step``: all its entries at a dense step or while its masks
    are all ones, else its unmasked and active entries plus its min and max; ``size`` bytes
    each."""
    masks = trace["masks"][step]
    numel = sum(trace["numel"][n] for n in params)
    if dense or all(bool(masks[n].all()) for n in params if n in masks):
        return size * numel
    kept = sum(int(masks[n].sum()) - trace["numel"][n] for n in params if n in masks)
    return size * (numel + kept + 2)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["d2s", "s2s"])
def test_a_whole_run_is_bit_for_bit_the_run_without_the_hook(
    workers: list[dict[str, Any]], scenario: str
) -> None:
    for rank, result in enumerate(workers):
        plain, sparse = result[scenario]
        _assert_runs_identical(plain, sparse, f"{scenario} rank {rank}")
        assert [h["step"] for h in sparse["history"]] == UPDATES[scenario]
        assert sparse["history"][-1]["density"] == pytest.approx(0.2, abs=1e-3)
    _assert_same(workers[0][scenario][1]["weights"], workers[1][scenario][1]["weights"], "ranks")


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["d2s", "s2s"])
def test_gradients_are_plain_ddps_where_they_travel_and_zero_elsewhere(
    workers: list[dict[str, Any]], scenario: str
) -> None:
    for rank, result in enumerate(workers):
        plain, sparse = result[scenario]
        assert _assert_gradients(plain, sparse, f"{scenario} rank {rank}") == {True, False}
        dense = [s for s, d in sparse["steps"].items() if d]
        assert dense == UPDATES[scenario]  # exactly the steps whose update regrows


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["d2s", "s2s", "inactive_inf", "sparse_bf16"])
def test_the_byte_count_is_the_packed_sizes(workers: list[dict[str, Any]], scenario: str) -> None:
    """bytes_sent: per bucket all its entries or its active and unmasked ones plus 2;
    bytes_dense: all entries of every bucket; every parameter in one bucket per step."""
    size = 2 if scenario == "sparse_bf16" else 4
    for result in workers:
        trace = result[scenario] if scenario == "sparse_bf16" else result[scenario][1]
        sent, dense = trace["bytes"]
        steps = sorted({s for s, _, _, _ in trace["buckets"]})
        assert steps == list(range(1, 19))
        for step in steps:
            params = [n for s, _, ps, _ in trace["buckets"] if s == step for n in ps]
            assert sorted(params) == sorted(trace["numel"]), step
        for step, is_dense, params, step_bytes in trace["buckets"]:
            expected = _bucket_bytes(trace, step, is_dense, params, size)
            assert step_bytes == expected, (step, params)
        assert sent == sum(b for _, _, _, b in trace["buckets"])
        assert dense == size * 18 * sum(trace["numel"].values())
        assert sent < dense
    if scenario == "s2s":  # DDP rebuilt its buckets after the first step
        buckets = {s: {ps for t, _, ps, _ in trace["buckets"] if t == s} for s in (1, 2, 3)}
        assert buckets[1] != buckets[2] == buckets[3] and len(buckets[2]) > 1


@pytest.mark.slow
def test_the_dense_phase_of_a_dense_to_sparse_run_sends_every_gradient(
    workers: list[dict[str, Any]],
) -> None:
    _, sparse = workers[0]["d2s"]
    total = 4 * sum(sparse["numel"].values())
    per_step = {s: 0 for s in range(1, 19)}
    for step, _, _, step_bytes in sparse["buckets"]:
        per_step[step] += step_bytes
    for step, step_bytes in per_step.items():
        if step <= 9 or step in (12, 15):  # all ones up to the prune at 9; update steps
            assert step_bytes == total, step
        else:
            assert step_bytes < 0.6 * total, step


@pytest.mark.slow
def test_a_postponed_update_reads_dense_gradients_at_the_step_it_runs(
    workers: list[dict[str, Any]],
) -> None:
    for rank, result in enumerate(workers):
        plain, sparse = result["postponed"]
        _assert_runs_identical(plain, sparse, f"postponed rank {rank}")
        update = next(h for h in sparse["history"] if h["due_step"] == POSTPONED)
        assert update["step"] == POSTPONED + 1
        assert POSTPONED not in sparse["steps"]  # the GradScaler skipped the overflow
        assert sparse["steps"][POSTPONED + 1] and not sparse["steps"][POSTPONED + 2]
        _assert_gradients(plain, sparse, f"postponed rank {rank}")
        masks = sparse["masks"][POSTPONED + 1]  # dense: the inactive entries travelled too
        grads = sparse["grads"][POSTPONED + 1]
        assert any(bool((grads[n][~m] != 0).any()) for n, m in masks.items())


@pytest.mark.slow
def test_an_inactive_non_finite_gradient_still_skips_the_step(
    workers: list[dict[str, Any]],
) -> None:
    """Plain DDP sums an inf of an inactive entry into the gradient, so the GradScaler skips
    the step: the min and max the hook sends along make it skip too, on both workers."""
    for rank, result in enumerate(workers):
        plain, sparse = result["inactive_inf"]
        _assert_runs_identical(plain, sparse, f"inactive_inf rank {rank}")
        assert INACTIVE_INF not in sparse["steps"] and INACTIVE_INF - 1 in sparse["steps"]
        scales = sparse["scales"]
        assert scales[INACTIVE_INF - 1] == scales[INACTIVE_INF - 2] / 2  # backed off
        _assert_gradients(plain, sparse, f"inactive_inf rank {rank}")


@pytest.mark.slow
def test_bf16_compression_is_ddps_bf16_hook_where_gradients_travel(
    workers: list[dict[str, Any]],
) -> None:
    for rank, result in enumerate(workers):
        reference, sparse = result["ddp_bf16"], result["sparse_bf16"]
        _assert_runs_identical(reference, sparse, f"bf16 rank {rank}")
        assert _assert_gradients(reference, sparse, f"bf16 rank {rank}") == {True, False}
        # close to fp32 where the gradients travel, until the masks part (regrowth ranks
        # slightly different gradients at the update of step 3)
        fp32, _ = result["s2s"]
        for step in (1, 2, 3):
            for name, grad in fp32["grads"][step].items():
                mask = sparse["masks"][step].get(name, torch.ones_like(grad, dtype=torch.bool))
                if sparse["steps"][step]:
                    mask = torch.ones_like(mask)
                got, expected = sparse["grads"][step][name][mask], grad[mask]
                error = float((got - expected).norm() / expected.norm())
                assert error < 1e-2, (step, name, error)
        assert sparse["history"][-1]["density"] == pytest.approx(0.2, abs=1e-3)


# ---- without a process group ---------------------------------------------------------------


def test_packed_offsets_follow_each_parameters_memory_order() -> None:
    """A channels-last conv weight, a bias and a linear weight in one bucket: the positions
    are the unmasked entries and the active ones, in memory order, in increasing order."""
    conv = torch.zeros(4, 3, 2, 2).to(memory_format=torch.channels_last)
    bias = torch.zeros(4)
    linear = torch.zeros(5, 6)
    generator = torch.Generator().manual_seed(0)
    masks = {
        id(conv): torch.rand(conv.shape, generator=generator) < 0.4,
        id(linear): torch.rand(linear.shape, generator=generator) < 0.3,
    }
    params = [conv, bias, linear]
    offsets = [0, 48, 52]
    counts = {k: int(m.sum()) for k, m in masks.items()}
    index = packed_offsets(params, offsets, 82, masks, counts)
    assert index is not None and index.dtype == torch.int64
    expected = [
        torch.arange(48).as_strided(conv.shape, conv.stride())[masks[id(conv)]],
        torch.arange(48, 52),
        52 + torch.arange(30).view(5, 6)[masks[id(linear)]],
    ]
    assert index.tolist() == sorted(torch.cat(expected).tolist())
    active = sum(int(m.sum()) for m in masks.values())
    assert index.numel() == active + bias.numel()  # the packed vector, less min and max
    all_ones = {k: torch.ones_like(m) for k, m in masks.items()}
    full = {k: m.numel() for k, m in all_ones.items()}
    assert packed_offsets(params, offsets, 82, all_ones, full) is None  # plain all-reduce
    assert packed_offsets([bias], [0], 4, masks, counts) is None


def test_compression_is_bf16_or_fp16() -> None:
    with pytest.raises(ValueError, match="compress=torch.float64 is invalid"):
        SparseAllReduce(None, compress=torch.float64)  # type: ignore[arg-type]
