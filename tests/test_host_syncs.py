"""Host-device synchronizations of the engine and the sparse all-reduce hook, counted on the
CPU: ``SyncCounter`` counts every call that would make the host wait for a CUDA device (a
scalar read: ``item`` / ``int`` / ``float`` / ``bool``; ``nonzero``, ``masked_select``,
``unique``, indexing with a bool mask; ``tolist`` / ``numpy``). A mask update makes a fixed
handful whatever the number of layers (3 in one process; 5 with the workers' agreement and the
exact mask check); a training step between updates makes none, also with DDP and the hook,
also the first step after an update (the hook's packing is rebuilt at the update)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from tiny import tiny_train
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

from granet_ray.config import GraNetConfig
from granet_ray.distributed import DistributedSync, SparseAllReduce, register_sparse_allreduce
from granet_ray.recipe import Sums, build_run, train_steps
from granet_ray.sparsity import GraNet, criteria

pytestmark = pytest.mark.usefixtures("one_thread", "device_path")


@pytest.fixture
def device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the syncs of the path CUDA takes: on the CPU a selection may gather its tied
    positions with a sync, which costs nothing there (``criteria.GATHER_TIES_ON_CPU``)."""
    monkeypatch.setattr(criteria, "GATHER_TIES_ON_CPU", False)

aten = torch.ops.aten
# ops whose CUDA kernels wait for the device: a scalar read, or an output sized by the data
SYNCING = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.repeat_interleave,
}
INDEXING = {aten.index, aten.index_put, aten.index_put_}  # synchronizing with a bool mask


class SyncCounter(TorchDispatchMode):
    """Counts synchronizing calls by name while active: the aten ops of ``SYNCING``, indexing
    with a bool mask, and ``Tensor.tolist`` / ``Tensor.numpy`` (which read the data without
    an aten op on the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._patched: dict[str, Any] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        packet = func.overloadpacket
        if packet in SYNCING:
            self.counts[packet.__name__] += 1
        elif packet in INDEXING and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.counts[f"{packet.__name__} (bool mask)"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> SyncCounter:
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def counted(tensor: torch.Tensor, *a: Any, _n: str = name, _o: Any = original) -> Any:
                self.counts[_n] += 1
                return _o(tensor, *a)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)
        self._patched = {}
        super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def test_the_counter_counts_each_synchronizing_call() -> None:
    t = torch.arange(6.0)
    mask = t > 2
    with SyncCounter() as counter:
        int(t[0])
        float(t[1])
        bool(t[2])
        t.sum().item()
        t.nonzero()
        t[mask]
        t.tolist()
        t.numpy()
        t[mask] = 0.0
        t.masked_fill(mask, 1.0).sum()  # none of these waits
        torch.where(mask, t, -1.0).cumsum(0)
        torch.topk(t, 2).values.min()
    assert counter.counts == {
        "_local_scalar_dense": 4,
        "nonzero": 1,
        "index (bool mask)": 1,
        "index_put_ (bool mask)": 1,
        "tolist": 1,
        "numpy": 1,
    }
    assert torch.Tensor.tolist is not None and t.tolist() == [0.0, 1.0, 2.0, 0.0, 0.0, 0.0]


# ---- the engine alone ------------------------------------------------------------------------


def _model(layers: int) -> nn.Module:
    """``layers`` linear layers of 16 x 16 (a deeper net has more layers, nothing else)."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)])


def _update_syncs(layers: int, sync: Any = None, method: str = "granet") -> dict[str, Any]:
    """The host syncs of every ``engine.step()`` over 6 steps with updates at 2, 4 and 6 (for
    GraNet: prune and regrow, prune and regrow, regrow only)."""
    model = _model(layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    config = GraNetConfig(
        method=method, init_density=0.5, final_density=0.2, update_interval=2, prune_end=0.4
    )
    engine = GraNet(model, optimizer, config, total_steps=10, steps_per_epoch=10, sync=sync)
    per_step, updates = {}, []
    g = torch.Generator().manual_seed(1)
    for step in range(1, 7):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
        with SyncCounter() as counter:
            stats = engine.step()
        per_step[step] = counter.total
        if stats is not None:
            updates.append((step, stats["target_density"] is not None))
    return {"per_step": per_step, "updates": updates}


@pytest.mark.parametrize("layers", [2, 12])
def test_a_mask_update_makes_three_host_syncs_whatever_the_layer_count(layers: int) -> None:
    """The finite-gradient check, the layers' counts after the global prune, the number of
    newly grown weights: 3 with a prune, 2 without; none at any other step."""
    result = _update_syncs(layers)
    assert result["updates"] == [(2, True), (4, True), (6, False)]
    assert result["per_step"] == {1: 0, 2: 3, 3: 0, 4: 3, 5: 0, 6: 2}


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_regrow_only_methods_make_two_per_update(method: str) -> None:
    """SET's random scores come from the device-side stream (no transfer per layer), RigL's
    from the gradients: the finite-gradient check and the statistics."""
    result = _update_syncs(12, method=method)
    assert result["updates"] == [(2, False), (4, False), (6, False)]
    assert result["per_step"] == {1: 0, 2: 2, 3: 0, 4: 2, 5: 0, 6: 2}


@pytest.fixture
def gloo_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group, destroyed afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layers", [2, 12])
def test_with_the_distributed_sync_an_update_adds_two(gloo_group: None, layers: int) -> None:
    """The workers' agreement on finite gradients and the exact mask check: one each."""
    result = _update_syncs(layers, DistributedSync())
    assert result["per_step"] == {1: 0, 2: 5, 3: 0, 4: 5, 5: 0, 6: 4}


# ---- a whole step with DDP and the sparse all-reduce hook -------------------------------------


def test_steps_with_ddp_and_the_hook_make_none_between_updates(gloo_group: None) -> None:
    """The recipe with DDP and the sparse all-reduce hook on GPU-resident-like batches (the
    same tensors every step, no data loader): after DDP's bucket rebuild (step 2) a step
    without an update makes no host sync, the first step after an update none either (the
    packing was rebuilt at the update, without one), an update step 5."""
    train = tiny_train(
        train_size=256,
        global_batch=32,
        epochs=1,
        sparse_allreduce=True,
        granet=GraNetConfig(
            init_density=0.5, final_density=0.2, update_interval=3, prune_start=0, prune_end=1
        ),
    )
    cpu = torch.device("cpu")
    run = build_run(
        train, device=cpu, wrap=lambda net: DDP(net, bucket_cap_mb=0.05), sync=DistributedSync()
    )
    assert run.allreduce is None  # one process: the recipe registers it from 2 on
    run.allreduce = register_sparse_allreduce(run.model, run.engine)
    assert isinstance(run.allreduce, SparseAllReduce)
    inputs = torch.stack([run.data.train[i][0] for i in range(32)])
    targets = torch.tensor([int(run.data.train[i][1]) for i in range(32)])
    run.train_loader = itertools.repeat((inputs, targets))  # type: ignore[assignment]
    steps = train_steps(run, 0, Sums.zeros(cpu))
    counts, updates = {}, []
    for step in range(1, 9):
        with SyncCounter() as counter:
            info = next(steps)
        counts[step] = counter.total
        if info.update is not None:
            updates.append(step)
    assert updates == [3, 6]
    assert {s: c for s, c in counts.items() if s > 2} == {3: 5, 4: 0, 5: 0, 6: 5, 7: 0, 8: 0}
    assert run.allreduce.bytes_sent < run.allreduce.bytes_dense
