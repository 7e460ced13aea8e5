"""The GPU training path, tested on the CPU (what tests/test_engine.py, test_recipe.py and
test_criteria.py leave out): the channels-last path end to end through ``build_run``, bf16
autocast with evaluation, the DataLoader options and persistent workers, precision on a
(faked) CUDA device and its flags, cudnn.benchmark left alone on the CPU, torch.compile
(inductor) through ``build_run``, the dense baseline that never masks, the CUDA threshold
method giving the same run, progress reads at intervals only (``benchmarks/gpu_check.py``:
tests/test_gpu_check.py). No Ray."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import tiny_train
from tiny import weights as _weights

from granet_ray import local, recipe
from granet_ray.cli import build_parser
from granet_ray.cli import recipe as cli_recipe
from granet_ray.config import PRECISIONS, GraNetConfig, TrainConfig
from granet_ray.events import Stepped
from granet_ray.recipe import (
    Hooks,
    Position,
    ProgressHooks,
    Run,
    Sums,
    autocast,
    build_run,
    loader_options,
    resolve_precision,
    run_epochs,
    train_steps,
)
from granet_ray.resume import restore, rng_state, save_checkpoint
from granet_ray.sparsity import criteria

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing here runs on it
CL = torch.channels_last
Tensors = dict[str, torch.Tensor]


pytestmark = pytest.mark.usefixtures("one_thread")


def _resnet(**changes: Any) -> TrainConfig:
    """The tiny run on ResNet-20 (BatchNorm, 3-channel inputs) and synthetic CIFAR-10."""
    return tiny_train(**{"model": "resnet20", "dataset": "synthetic_cifar10", **changes})


def _assert_masked(run: Run) -> None:
    for n, p in run.engine.params.items():
        assert bool((p.detach()[~run.engine.masks[n]] == 0).all()), n


def _conv_tensors(run: Run) -> dict[str, torch.Tensor]:
    """Every 4-d prunable weight with its mask, momentum and masking multiplier."""
    out = {}
    for i, (n, p) in enumerate(run.engine.params.items()):
        if p.dim() == 4:
            out[n] = p.detach()
            out[f"{n}/mask"] = run.engine.masks[n]
            out[f"{n}/momentum"] = run.optimizer.state[p]["momentum_buffer"]
            out[f"{n}/multiplier"] = run.engine._multiplier(i, p.dtype)
    return out


# ---- channels-last end to end ----------------------------------------------------------------


def test_the_channels_last_path_on_the_cpu_keeps_the_format_and_matches_contiguous() -> None:
    """``build_run(channels_last=True)`` runs the CUDA memory-format path on the CPU: inputs,
    weights, masks, momentum and multipliers stay channels-last through every step and both
    mask updates; masks equal the contiguous run's exactly, weights to float tolerance (the
    MNIST net: ResNet-20's BatchNorm on random labels amplifies the kernels' rounding to
    0.5% of a gradient, enough to reorder near-equal regrowth scores)."""
    small = tiny_train()
    contiguous = build_run(small, device=CPU, channels_last=False)
    last = build_run(small, device=CPU, channels_last=True)
    assert not contiguous.channels_last and last.channels_last
    assert not last.net.conv2.weight.is_contiguous()  # (64, 32, 3, 3): a real layout change
    inputs: list[bool] = []
    last.net.conv1.register_forward_pre_hook(
        lambda _m, args: inputs.append(args[0].is_contiguous(memory_format=CL))
    )
    for epoch in range(2):
        steps = zip(
            train_steps(contiguous, epoch, Sums.zeros(CPU)),
            train_steps(last, epoch, Sums.zeros(CPU)),
            strict=True,
        )
        for a, b in steps:
            assert (a.step, a.update is None) == (b.step, b.update is None)
            for n, t in _conv_tensors(last).items():
                assert t.is_contiguous(memory_format=CL), (b.step, n)
            for n, m in contiguous.engine.masks.items():
                assert torch.equal(last.engine.masks[n], m), (b.step, n)
            torch.testing.assert_close(float(b.loss), float(a.loss), rtol=1e-5, atol=1e-6)
    assert inputs == [True] * 6
    assert all(t.is_contiguous() for t in _conv_tensors(contiguous).values())
    assert [h["step"] for h in last.engine.history] == [2, 4]
    assert last.engine.history == contiguous.engine.history
    torch.testing.assert_close(_weights(last), _weights(contiguous), rtol=1e-4, atol=1e-5)
    _assert_masked(last)
    a, b = recipe.evaluate(contiguous), recipe.evaluate(last)
    assert a.correct == b.correct and a.loss == pytest.approx(b.loss, rel=1e-5)


class _Dtypes(Hooks):
    """The output dtypes of the model's last layer, per epoch, in training and evaluation."""

    def __init__(self, run: Run) -> None:
        self.seen: list[torch.dtype] = []
        run.net.fc.register_forward_hook(lambda _m, _i, out: self.seen.append(out.dtype))
        self.metrics: list[dict[str, Any]] = []

    def on_epoch(
        self, run: Run, metrics: dict[str, Any], position: Position, checkpoint: bool
    ) -> None:
        self.metrics.append(metrics)


def test_a_resumed_channels_last_run_keeps_its_optimizer_state_channels_last(
    tmp_path: Path,
) -> None:
    """The checkpoint stores state densely; on resume every weight-shaped optimizer state
    gets its weight's strides back, or every later step would mix memory formats."""
    cfg = tiny_train()
    run = build_run(cfg, device=CPU, channels_last=True)
    list(train_steps(run, 0, Sums.zeros(CPU)))
    uri = save_checkpoint(run, Position(1, 0), str(tmp_path / "ck"), [rng_state()])
    resumed = build_run(cfg, device=CPU, channels_last=True)
    restore(resumed, uri)
    for name, tensor in _conv_tensors(resumed).items():
        assert tensor.is_contiguous(memory_format=CL), name
    list(train_steps(resumed, 1, Sums.zeros(CPU)))
    for name, tensor in _conv_tensors(resumed).items():
        assert tensor.is_contiguous(memory_format=CL), name


def test_bf16_autocast_with_channels_last_through_run_epochs() -> None:
    """The GPU default (bf16 autocast, channels-last) through ``run_epochs`` on the CPU:
    training and evaluation run in bf16, weights stay fp32 and channels-last."""
    run = build_run(_resnet(precision="bf16", epochs=1), device=CPU, channels_last=True)
    hooks = _Dtypes(run)
    run_epochs(run, hooks)
    assert run.precision == "bf16" and run.scaler is None
    assert hooks.seen == [torch.bfloat16] * (3 + 2)  # 3 steps, then 2 test batches
    assert all(p.dtype == torch.float32 for p in run.net.parameters())
    assert all(t.is_contiguous(memory_format=CL) for t in _conv_tensors(run).values())
    for metrics in hooks.metrics:
        assert torch.isfinite(torch.tensor([metrics["train_loss"], metrics["val_loss"]])).all()
    assert hooks.metrics[-1]["density"] == pytest.approx(0.2, abs=1e-5)
    _assert_masked(run)


# ---- the DataLoader ---------------------------------------------------------------------------


def test_loader_options_pin_memory_on_cuda_only_and_keep_prefetching_workers() -> None:
    assert loader_options(CPU, 0) == {"num_workers": 0, "pin_memory": False}
    assert loader_options(CUDA, 0) == {"num_workers": 0, "pin_memory": True}
    assert loader_options(CUDA, 3) == {
        "num_workers": 3,
        "pin_memory": True,
        "persistent_workers": True,
        "prefetch_factor": 4,
    }
    run = build_run(_resnet(), device=CPU, loader_workers=2)
    for loader in (run.train_loader, run.test_loader):
        assert not loader.pin_memory and loader.num_workers == 2
        assert loader.persistent_workers and loader.prefetch_factor == 4


class _Workers(Hooks):
    """The process ids of the training loader's workers at every epoch end."""

    def __init__(self) -> None:
        self.pids: list[list[int]] = []
        self.metrics: list[dict[str, Any]] = []

    def on_epoch(
        self, run: Run, metrics: dict[str, Any], position: Position, checkpoint: bool
    ) -> None:
        if run.train_loader.num_workers:
            self.pids.append([w.pid for w in run.train_loader._iterator._workers])
        self.metrics.append({k: v for k, v in metrics.items() if k != "samples_per_second"})


def test_loader_workers_live_across_epochs_and_give_the_same_run() -> None:
    """Two persistent, prefetching loader processes feed the same batches as the loop's own
    process (the sampler's new shares are read at every epoch): the run ends bit for bit
    where it ends without workers, and the same worker processes served both epochs."""
    plain = build_run(_resnet(), device=CPU)
    pooled = build_run(_resnet(), device=CPU, loader_workers=2)
    plain_hooks, pooled_hooks = _Workers(), _Workers()
    run_epochs(plain, plain_hooks)
    run_epochs(pooled, pooled_hooks)
    first, second = pooled_hooks.pids
    assert len(first) == 2 and first == second
    assert pooled_hooks.metrics == plain_hooks.metrics
    for n, t in _weights(plain).items():
        assert torch.equal(_weights(pooled)[n], t), n


@pytest.mark.parametrize(
    ("device", "cpus", "expected"),
    [("cpu", 16, 0), ("cuda", 16, 4), ("cuda", 3, 2), ("cuda", 1, 0), ("cuda", None, 0)],
)
def test_a_run_in_this_process_uses_loader_workers_on_cuda_only(
    monkeypatch: pytest.MonkeyPatch, device: str, cpus: int | None, expected: int
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert local.default_loader_workers(torch.device(device)) == expected


# ---- precision, flags, cudnn ------------------------------------------------------------------


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_is_bf16_where_supported_else_fp16(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", CUDA) == expected
    for precision in ("fp32", "fp16", "bf16"):
        assert resolve_precision(precision, CUDA) == precision


def test_autocast_of_each_precision() -> None:
    with autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(CPU, precision):
            assert torch.is_autocast_enabled("cpu")
            assert torch.get_autocast_dtype("cpu") == dtype
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


def _flags(*flags: str) -> TrainConfig:
    return cli_recipe(build_parser().parse_args(["train", *flags]))[0]


def test_precision_memory_format_and_compile_flags() -> None:
    assert _flags().precision == "auto" and _flags().channels_last and not _flags().compile
    for precision in PRECISIONS:
        assert _flags("--precision", precision).precision == precision
    assert not _flags("--no-channels-last").channels_last
    assert _flags("--compile").compile


def test_an_unknown_precision_flag_is_refused_naming_the_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--precision", "fp8"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_cudnn_benchmark_is_left_alone_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    build_run(_resnet(), device=CPU)
    assert torch.backends.cudnn.benchmark is False  # set on CUDA only (tests/test_gpu.py)


# ---- torch.compile ----------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_with_inductor_through_build_run_masks_the_weights_the_graph_reads() -> None:
    """``compile=True``: the loop calls the compiled model, the engine masks the plain
    module's weights (which the compiled graph reads, not a copy): the run matches eager."""
    small = tiny_train(epochs=1)
    compiled = build_run(small.replace(compile=True), device=CPU)
    eager = build_run(small, device=CPU)
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.model._orig_mod is compiled.net
    assert list(compiled.engine.masks) == list(eager.engine.masks)
    for a, b in zip(
        train_steps(eager, 0, Sums.zeros(CPU)),
        train_steps(compiled, 0, Sums.zeros(CPU)),
        strict=True,
    ):
        assert (a.update is None) == (b.update is None)
        torch.testing.assert_close(float(b.loss), float(a.loss), rtol=1e-4, atol=1e-5)
        for n, m in eager.engine.masks.items():
            assert torch.equal(compiled.engine.masks[n], m), (b.step, n)
    assert [h["step"] for h in compiled.engine.history] == [2]
    _assert_masked(compiled)
    torch.testing.assert_close(_weights(compiled), _weights(eager), rtol=1e-4, atol=1e-5)


# ---- masking: the dense baseline; the threshold: the CUDA method -------------------------------


def test_the_dense_baseline_never_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """``method=static`` at ``final_density=1.0`` (gpu_check's dense run): all-ones masks, no
    masking pass and no update ever: the engine adds nothing to plain training."""
    calls: list[int] = []
    foreach_mul = torch._foreach_mul_
    monkeypatch.setattr(
        torch, "_foreach_mul_", lambda *a, **k: calls.append(1) or foreach_mul(*a, **k)
    )
    dense = _resnet(granet=GraNetConfig(method="static", final_density=1.0))
    run = build_run(dense, device=CPU)
    for epoch in range(2):
        assert all(i.update is None for i in train_steps(run, epoch, Sums.zeros(CPU)))
    assert calls == [] and run.engine.history == [] and run.engine.density() == 1.0
    assert run.engine.next_update_step() is None


def test_the_cuda_threshold_method_gives_the_same_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every mask decision with topk (the CUDA default) instead of kthvalue (the CPU's):
    the same masks, weights and update statistics, bit for bit, through the recipe."""
    runs = {}
    kth_largest = criteria.kth_largest
    for method in ("kthvalue", "topk"):
        with monkeypatch.context() as patch:
            patch.setattr(
                criteria,
                "kth_largest",
                lambda flat, k, m=method, **_: kth_largest(flat, k, method=m),
            )
            run = build_run(tiny_train(), device=CPU)
            for epoch in range(2):
                list(train_steps(run, epoch, Sums.zeros(CPU)))
        runs[method] = run
    a, b = runs["kthvalue"], runs["topk"]
    assert [h["step"] for h in a.engine.history] == [2, 4]
    assert a.engine.history == b.engine.history
    for n, m in a.engine.masks.items():
        assert torch.equal(b.engine.masks[n], m), n
    for n, t in _weights(a).items():
        assert torch.equal(_weights(b)[n], t), n


# ---- progress reads -------------------------------------------------------------------------


def test_progress_reads_the_loss_at_intervals_updates_and_epoch_ends_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reading a step's loss waits for the device: ``ProgressHooks`` does it for the first
    step, a mask update, an epoch's last step, or after ``interval`` seconds, else never."""
    train = tiny_train(train_size=192, epochs=1)
    run = build_run(train, device=CPU)  # 6 steps, mask updates at 2, 4 and 6
    infos = list(train_steps(run, 0, Sums.zeros(CPU)))
    clock = iter([0.0, 0.1, 0.2, 0.3, 0.9, 1.0])
    monkeypatch.setattr(recipe.time, "monotonic", lambda: next(clock))
    events: list[Stepped] = []
    hooks = ProgressHooks(events.append, interval=0.5)
    for info in infos:
        hooks.on_step(run, info)
    # 1: the first; 2, 4: updates; not 3 (0.1 s after 2); 5: 0.6 s after 4; 6: the last
    assert [e.step for e in events] == [1, 2, 4, 5, 6]
    assert all(isinstance(e.loss, float) for e in events)
