"""The GPU training path on a CUDA device (marked ``gpu``, skipped without CUDA; run by
``benchmarks/gpu_check.py``): CUDA masks equal CPU masks with either threshold method, also
where bf16 or zero gradients tie in masses (the random tie-break keys are the same on both),
an fp16 GradScaler overflow at an update step postpones the update, no host sync between mask
updates and a handful at one, none in backward with the sparse all-reduce hook, build_run's
CUDA settings (fused optimizer), the recipe under a one-process NCCL group (60 s timeout, the
GPU bound up front: DDP, the exact mask check on CUDA tensors, with and without the sparse
all-reduce hook, a checkpoint round trip) and torch.compile with the engine. No Ray."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from tiny import tiny_train
from torch.nn.parallel import DistributedDataParallel as DDP

from granet_ray.config import GraNetConfig, RunSettings, TrainConfig
from granet_ray.distributed import DistributedSync, SparseAllReduce, register_sparse_allreduce
from granet_ray.local import fit_local
from granet_ray.models import build_model
from granet_ray.recipe import Hooks, Position, Run, Sums, build_run, evaluate, train_steps
from granet_ray.sparsity import criteria, prunable_parameters
from granet_ray.sparsity.criteria import (
    TieBreak,
    global_magnitude_prune,
    keep_top,
    layerwise_magnitude_prune,
    prune_and_regrow,
)
from granet_ray.store import load_sparse
from granet_ray.testing.ports import free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU = torch.device("cuda")
CPU = torch.device("cpu")
CL = torch.channels_last
Tensors = dict[str, torch.Tensor]
TIES = TieBreak(seed=0, update=1)


def _cuda_train(**changes: Any) -> TrainConfig:
    """The tiny run with the GPU defaults: auto precision, channels-last on CUDA."""
    return tiny_train(**{"precision": "auto", "channels_last": True, **changes})


def _on(tensors: Tensors, device: torch.device) -> Tensors:
    return {n: t.to(device) for n, t in tensors.items()}


def _assert_equal(got: Tensors, expected: Tensors, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for n, t in expected.items():
        assert torch.equal(got[n].cpu(), t.cpu()), f"{what}: {n}"


def _assert_masked(run: Run) -> None:
    for n, p in run.engine.params.items():
        assert bool((p.detach()[~run.engine.masks[n]] == 0).all()), n


# ---- 1. masks: CUDA equals the CPU --------------------------------------------------------------


def _tied(n: int, seed: int) -> torch.Tensor:
    """n CPU scores from 9 distinct values (many ties), a fifth of them -1 (inactive)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 9, (n,), generator=g).float() * 0.125
    scores[torch.rand(n, generator=g) < 0.2] = -1.0
    return scores


@pytest.mark.parametrize("method", ["kthvalue", "topk"])
@pytest.mark.parametrize("n", [1, 7, 1000, 2**20 + 3])
def test_keep_top_on_cuda_equals_the_cpu(method: str, n: int) -> None:
    """Ties to the lower index (no keys) and to the larger random key: the same on both."""
    scores = _tied(n, seed=n)
    ks = range(n + 2) if n <= 1000 else [0, 1, 2, n // 10, n // 2, n // 2 + 1, n - 3, n - 1, n]
    on_gpu = scores.to(GPU)
    keys = TIES.keys("layer", "grow", n)
    on_gpu_keys = TIES.keys("layer", "grow", n, GPU)
    assert torch.equal(on_gpu_keys.cpu(), keys)  # the keys themselves, computed on CUDA
    for k in ks:
        got = keep_top(on_gpu, k, method=method)
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), keep_top(scores, k)), k  # the CPU default: kthvalue
        keyed = keep_top(on_gpu, k, on_gpu_keys, method=method)
        assert torch.equal(keyed.cpu(), keep_top(scores, k, keys)), k


@pytest.fixture(scope="module")
def resnet50_layers() -> dict[str, Tensors]:
    """ResNet-50's prunable weights (25.5 M) rounded to multiples of 1/64 (many ties), half of
    them active, gradients rounded to bf16 (8 significant bits: masses of ties), every
    fourth layer's all zero (dead units); and the CPU's masks of a global prune to 0.3, a
    layer-wise prune to 0.3 and a regrowth of 0.3 of each layer."""
    net = build_model("resnet50")
    g = torch.Generator().manual_seed(0)
    weights, grads, masks = {}, {}, {}
    for i, (n, p) in enumerate(prunable_parameters(net).items()):
        masks[n] = torch.rand(p.shape, generator=g) < 0.5
        weights[n] = (p.detach() * 64).round() / 64 * masks[n]
        grads[n] = (torch.randn(p.shape, generator=g) * 1e-3).bfloat16().float() * (i % 4 > 0)
    return {
        "weights": weights,
        "grads": grads,
        "masks": masks,
        "global": global_magnitude_prune(weights, masks, 0.3, TIES),
        "layer": layerwise_magnitude_prune(weights, masks, 0.3, TIES),
        "regrow": prune_and_regrow(weights, grads, masks, 0.3, TIES),
    }


@pytest.mark.parametrize("method", [None, "kthvalue", "topk"])
def test_global_prune_and_regrowth_on_cuda_equal_the_cpu(
    resnet50_layers: dict[str, Tensors], method: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On identical ResNet-50 tensors every criterion gives the CPU's masks, ties included, with
    the CUDA default (None: topk, never kthvalue's slow CUDA kernel) or either method forced."""
    if method is None:
        kthvalue = torch.kthvalue

        def cpu_only(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            assert t.device.type == "cpu", "kthvalue on a CUDA tensor"
            return kthvalue(t, *args, **kwargs)

        monkeypatch.setattr(torch, "kthvalue", cpu_only)
    else:
        kth_largest = criteria.kth_largest
        monkeypatch.setattr(
            criteria, "kth_largest", lambda flat, k, **_: kth_largest(flat, k, method=method)
        )
    ref = resnet50_layers
    weights, grads, masks = (_on(ref[k], GPU) for k in ("weights", "grads", "masks"))
    pruned = global_magnitude_prune(weights, masks, 0.3, TIES)
    assert all(m.device.type == "cuda" for m in pruned.values())
    _assert_equal(pruned, ref["global"], "global prune")
    layer = layerwise_magnitude_prune(weights, masks, 0.3, TIES)
    _assert_equal(layer, ref["layer"], "layer prune")
    _assert_equal(prune_and_regrow(weights, grads, masks, 0.3, TIES), ref["regrow"], "regrowth")


# ---- 2. an fp16 overflow at an update step ------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")
def test_fp16_overflow_at_an_update_step_postpones_the_update() -> None:
    run = build_run(_cuda_train(precision="fp16"), device=GPU)
    assert isinstance(run.scaler, torch.amp.GradScaler) and run.scaler._device == "cuda"
    steps = train_steps(run, 0, Sums.zeros(GPU))
    assert next(steps).update is None
    before = {n: t.detach().clone() for n, t in run.net.state_dict().items()}
    run.scaler.load_state_dict({**run.scaler.state_dict(), "scale": 2.0**60})
    info = next(steps)  # step 2: an update is due, the scaled fp16 gradients overflow
    assert info.step == 2 and info.update is None and run.engine.pending == 2
    assert not all(bool(torch.isfinite(p.grad).all()) for p in run.engine.params.values())
    for n, t in run.net.state_dict().items():
        if t.is_floating_point() and "running" not in n:  # the optimizer step was skipped
            assert torch.equal(t, before[n]), n
    assert run.scaler.get_scale() == 2.0**59  # backed off
    run.scaler.load_state_dict({**run.scaler.state_dict(), "scale": 1.0})
    info = next(steps)  # step 3: finite gradients, the update runs with step 2's schedule
    assert info.update is not None and (info.update["step"], info.update["due_step"]) == (3, 2)
    assert run.engine.pending is None and info.update["target_density"] == 0.2
    _assert_masked(run)


# ---- 3. no host sync between mask updates ---------------------------------------------------


def _sync_counted_updates(run: Run, counts: list[int]) -> None:
    """Make ``run.engine.step()`` at a mask update count its host syncs into ``counts`` (CUDA's
    sync debug mode warning, not erring, there), and restore the erring mode after."""
    engine_step = run.engine.step

    def step_syncing_at_updates() -> dict[str, Any] | None:
        if run.engine.next_update_step() != run.engine.step_count + 1:
            return engine_step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return engine_step()
            finally:
                torch.cuda.set_sync_debug_mode("error")
                counts.append(sum("synchroniz" in str(w.message) for w in caught))

    run.engine.step = step_syncing_at_updates  # type: ignore[method-assign]


def _steps_under_sync_errors(
    run: Run, sums: Sums
) -> tuple[list[int], list[tuple[int, bool]], list[int]]:
    """One epoch of ``run``: two warm-up steps (cudnn autotuning, first allocations), then
    every step with CUDA's sync debug mode erring, except the mask updates, whose host
    syncs are counted. Returns the warm-up steps, (step, updated) of the others and the
    updates' sync counts."""
    counts: list[int] = []
    _sync_counted_updates(run, counts)
    steps = train_steps(run, 0, sums)
    warmup = [next(steps).step for _ in range(2)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        checked = [(info.step, info.update is not None) for info in steps]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return warmup, checked, counts


def test_no_host_sync_between_mask_updates_on_cuda() -> None:
    """After two warm-up steps, CUDA's sync debug mode makes every host sync an error, except
    inside ``engine.step()`` at a mask update, which makes at most 3 (the finite-gradient
    check, the layers' counts after the prune, the statistics) whatever the number of layers:
    the loop, the loader (pinned memory, non-blocking copies, persistent workers) and bf16
    autocast never wait for the GPU."""
    train = _cuda_train(
        model="resnet20",
        dataset="synthetic_cifar10",
        train_size=256,
        epochs=1,
        precision="bf16",
        granet=GraNetConfig(
            init_density=0.5, final_density=0.2, update_interval=3, prune_start=0, prune_end=1
        ),
    )
    run = build_run(train, device=GPU, loader_workers=2)
    sums = Sums.zeros(GPU)
    warmup, checked, counts = _steps_under_sync_errors(run, sums)
    assert warmup == [1, 2] and [s for s, _ in checked] == list(range(3, 9))
    assert [s for s, updated in checked if updated] == [3, 6]
    assert len(counts) == 2 and all(1 <= c <= 3 for c in counts), counts
    assert sums.read().count == 256


# ---- 4. build_run on CUDA -----------------------------------------------------------------------


def test_build_run_on_cuda_turns_on_cudnn_benchmark_channels_last_and_pinned_loaders(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    run = build_run(_cuda_train(model="resnet20", dataset="synthetic_cifar10"), device=GPU)
    assert torch.backends.cudnn.benchmark
    assert run.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert run.channels_last
    for n, p in run.engine.params.items():
        if p.dim() == 4:
            assert p.is_cuda and p.is_contiguous(memory_format=CL), n
            assert run.engine.masks[n].is_contiguous(memory_format=CL), n
    assert run.train_loader.pin_memory and run.test_loader.pin_memory
    assert run.optimizer.defaults["fused"]  # GradScaler reads no overflow flag per step
    plain = build_run(
        _cuda_train(model="resnet20", dataset="synthetic_cifar10", channels_last=False), device=GPU
    )
    assert not plain.channels_last
    assert all(p.is_contiguous() for p in plain.engine.params.values())


# ---- 5. the recipe under a one-process NCCL group ---------------------------------------------


@pytest.fixture
def nccl_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A one-process NCCL group on a free loopback port, the GPU bound up front (``device_id``)
    and a 60 s timeout (a hang fails the test instead of eating the check's time), NCCL's
    warnings shown; destroyed afterwards."""
    monkeypatch.setenv("NCCL_DEBUG", os.environ.get("NCCL_DEBUG", "WARN"))
    torch.cuda.set_device(0)
    init = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group(
        "nccl",
        init_method=init,
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
        device_id=torch.device("cuda", 0),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Capture(Hooks):
    """Keeps the run at every epoch end."""

    run: Run | None = None

    def on_epoch(
        self, run: Run, metrics: dict[str, Any], position: Position, checkpoint: bool
    ) -> None:
        self.run = run


def test_the_recipe_under_a_one_process_nccl_group(
    nccl_group: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fit_local`` in a one-process NCCL group: DDP, the ``DistributedSync`` whose exact mask
    check runs after every update on CUDA tensors, with ``sparse_allreduce`` off and on: in one
    process the recipe registers no hook (it could save nothing), so both runs are the plain
    all-reduce and give the same masks and weights (one worker, deterministic cudnn);
    the final checkpoint loads back bit for bit, on the CPU and on the GPU."""
    checks: list[tuple[int, set[str]]] = []
    check = DistributedSync.check

    def counted(self: DistributedSync, masks: Tensors, step: int) -> None:
        checks.append((step, {m.device.type for m in masks.values()}))
        check(self, masks, step)

    monkeypatch.setattr(DistributedSync, "check", counted)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    base = _cuda_train(
        model="resnet20",
        dataset="synthetic_cifar10",
        train_size=256,
        global_batch=64,
        granet=GraNetConfig(
            init_density=0.5, final_density=0.2, update_interval=2, prune_start=0, prune_end=1
        ),
    )  # 4 steps per epoch, 8 in all: updates at 2, 4 (prune + regrow) and 6 (regrow)
    runs: dict[bool, Run] = {}
    for sparse in (False, True):
        capture = _Capture()
        settings = RunSettings(storage_path=str(tmp_path), name=f"sparse_{sparse}")
        train = base.replace(sparse_allreduce=sparse)
        outcome = fit_local(train, settings, device=GPU, progress=False, hooks=[capture])
        run = capture.run
        assert run is not None and isinstance(run.model, DDP)
        assert isinstance(run.engine.sync, DistributedSync)
        assert run.engine.sync.device.type == "cuda"
        assert run.allreduce is None  # one process: registered from 2 processes on
        assert run.channels_last and run.precision in ("bf16", "fp16")
        assert run.train_loader.num_workers > 0 and run.train_loader.persistent_workers
        updates = [h["step"] for h in run.engine.history]
        assert updates == [2, 4, 6]
        assert checks[-3:] == [(s, {"cuda"}) for s in updates]
        assert outcome.metrics["step"] == 8 and abs(outcome.metrics["density"] - 0.2) < 1e-6
        model = build_model(train.model, num_classes=10)
        loaded = load_sparse(outcome.checkpoint_uri, model=model)
        _assert_equal(model.state_dict(), run.net.state_dict(), "loaded weights")
        _assert_equal(loaded.masks, run.engine.masks, "loaded masks")
        on_gpu = load_sparse(outcome.checkpoint_uri, map_location=GPU)
        assert all(m.device.type == "cuda" for m in on_gpu.masks.values())
        _assert_equal(on_gpu.masks, run.engine.masks, "masks loaded onto the GPU")
        runs[sparse] = run
    _assert_equal(runs[True].engine.masks, runs[False].engine.masks, "masks, hook vs plain")
    weights = {n: t.float() for n, t in runs[False].net.state_dict().items()}
    hooked = {n: t.float() for n, t in runs[True].net.state_dict().items()}
    torch.testing.assert_close(hooked, weights)


def test_the_sparse_allreduce_hook_never_syncs_in_backward(nccl_group: None) -> None:
    """DDP with the sparse all-reduce hook under NCCL: after two warm-up steps (DDP rebuilds
    its buckets) no step syncs with the host, the first step after each mask update included
    (the hook's packing is rebuilt at the update, without a sync), and the update itself
    makes a handful (the engine's 3, the workers' finite-gradient agreement, the mask check)."""
    train = _cuda_train(
        model="resnet20",
        dataset="synthetic_cifar10",
        train_size=256,
        global_batch=32,
        epochs=1,
        precision="bf16",
        sparse_allreduce=True,
        granet=GraNetConfig(
            init_density=0.5, final_density=0.2, update_interval=3, prune_start=0, prune_end=1
        ),
    )
    run = build_run(
        train, device=GPU, wrap=lambda net: DDP(net, device_ids=[0]), sync=DistributedSync()
    )
    run.allreduce = register_sparse_allreduce(run.model, run.engine)  # one process: by hand
    assert isinstance(run.allreduce, SparseAllReduce)
    warmup, checked, counts = _steps_under_sync_errors(run, Sums.zeros(GPU))
    assert warmup == [1, 2] and [s for s, _ in checked] == list(range(3, 9))
    assert [s for s, updated in checked if updated] == [3, 6]
    assert len(counts) == 2 and all(1 <= c <= 5 for c in counts), counts
    assert run.allreduce.bytes_sent < run.allreduce.bytes_dense


# ---- 6. torch.compile with the engine -----------------------------------------------------------


def test_a_compiled_model_trains_with_the_engine_on_cuda() -> None:
    """``compile=True`` (inductor): the engine masks the weights the compiled graph reads, in
    channels-last, and reaches the eager run's density at the same update; no graph break
    (the FLOPs were measured by an eager forward before compiling)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = build_run(_cuda_train(compile=True), device=GPU)
    eager = build_run(_cuda_train(), device=GPU)
    assert compiled.model is not compiled.net and compiled.model._orig_mod is compiled.net
    losses = {}
    for name, run in (("compiled", compiled), ("eager", eager)):
        infos = list(train_steps(run, 0, Sums.zeros(GPU)))
        assert [i.update is not None for i in infos] == [False, True, False], name
        losses[name] = torch.stack([i.loss for i in infos]).float().cpu()
        _assert_masked(run)
        assert run.net.conv2.weight.is_contiguous(memory_format=CL), name
        assert run.engine.masks["conv2.weight"].is_contiguous(memory_format=CL), name
    assert compiled.engine.density() == eager.engine.density()
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert compiled.engine.inference_flops() == eager.engine.inference_flops() is not None
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=0.05, atol=0.05)
    assert evaluate(compiled).count == 64
