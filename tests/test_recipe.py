"""The training recipe (``granet_ray.recipe``): the LR schedule and optimizer, the plan of
global steps, gradient accumulation, the global-batch recipe on real gloo processes
(docs/algorithm.md section 5), ``run_epochs`` with its hooks and a mid-epoch resume,
precision on the CPU, and no host syncs between mask updates. No Ray."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from processes import gloo_workers
from tiny import small_train, tiny_train
from tiny import weights as _weights
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from granet_ray.config import ConfigError, GraNetConfig, TrainConfig
from granet_ray.data.sharding import epoch_shares
from granet_ray.distributed import DistributedSync
from granet_ray.recipe import (
    Hooks,
    Plan,
    Position,
    Run,
    StepInfo,
    Sums,
    build_lr_schedule,
    build_optimizer,
    build_run,
    evaluate,
    lr_factor,
    plan_run,
    resolve_precision,
    run_epochs,
    train_steps,
)
from granet_ray.resume import restore, rng_state, save_checkpoint

CPU = torch.device("cpu")
Tensors = dict[str, torch.Tensor]


pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(run: Run) -> Tensors:
    return {n: p.grad.detach().clone() for n, p in run.net.named_parameters() if p.grad is not None}


def _masks(run: Run) -> Tensors:
    return {n: m.clone() for n, m in run.engine.masks.items()}


def _relative_error(got: Tensors, expected: Tensors) -> float:
    """The largest ||got - expected|| / ||expected|| over the tensors (same names)."""
    assert got.keys() == expected.keys()
    return max(float((got[n] - t).norm() / t.norm()) for n, t in expected.items())


def _assert_masked(run: Run) -> None:
    """Engine invariants: every weight outside its mask is exactly 0."""
    for name, param in run.engine.params.items():
        assert bool((param.detach()[~run.engine.masks[name]] == 0).all()), name


# ---- 1. LR schedule, optimizer, one epoch (the old test_loop.py) --------------------------------


def test_lr_factor_warmup_then_milestones() -> None:
    cfg = small_train(warmup_epochs=2, lr_milestones=(5, 8), lr_gamma=0.1)
    spe = 4  # warm-up is 8 steps; milestones at steps 20 and 32
    for step in range(8):
        assert lr_factor(step, cfg, spe) == pytest.approx((step + 1) / 8)
    assert lr_factor(7, cfg, spe) == 1.0
    for step in range(8, 20):
        assert lr_factor(step, cfg, spe) == 1.0
    for step in range(20, 32):
        assert lr_factor(step, cfg, spe) == pytest.approx(0.1)
    for step in range(32, 40):
        assert lr_factor(step, cfg, spe) == pytest.approx(0.01)


def test_lr_factor_without_warmup() -> None:
    cfg = small_train(lr_milestones=(3,), lr_gamma=0.5)
    assert [lr_factor(s, cfg, 10) for s in (0, 29, 30, 99)] == [1.0, 1.0, 0.5, 0.5]
    assert lr_factor(0, small_train(lr_milestones=()), 10) == 1.0  # no milestones, no warm-up
    assert lr_factor(99, small_train(lr_milestones=()), 10) == 1.0


def test_lr_schedule_drives_the_optimizer_per_step() -> None:
    cfg = small_train(lr=0.1, warmup_epochs=1, lr_milestones=(2,), lr_gamma=0.1)
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_lr_schedule(opt, cfg, steps_per_epoch=5)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1 * (s + 1) / 5 for s in range(5)] + [0.1] * 5 + [0.01] * 2
    assert seen == pytest.approx(expected)


def test_build_optimizer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    sgd = build_optimizer(model, small_train(momentum=0.9, nesterov=True, weight_decay=5e-4))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["momentum"] == 0.9
    assert sgd.param_groups[0]["weight_decay"] == 5e-4
    plain = build_optimizer(model, small_train(momentum=0.0, nesterov=True))
    assert plain.param_groups[0]["nesterov"] is False  # Nesterov needs momentum
    no_norm_wd = build_optimizer(model, small_train(weight_decay=1e-4, weight_decay_norm=False))
    by_id = {id(p): g["weight_decay"] for g in no_norm_wd.param_groups for p in g["params"]}
    norm_params = {id(p) for p in model[1].parameters()}
    assert set(by_id) == {id(p) for p in model.parameters()}  # every parameter once
    # docs/algorithm.md section 7: no weight decay on norm layers (biases keep it)
    for p in model.parameters():
        assert by_id[id(p)] == (0.0 if id(p) in norm_params else 1e-4)
    adam = build_optimizer(model, small_train(optimizer="adam", lr=0.01))
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 0.01
    build_optimizer(nn.Linear(2, 2), small_train(weight_decay_norm=False)).step()  # no norm layers


def test_epochs_decrease_the_loss_and_step_the_engine_once_per_global_step() -> None:
    cfg = tiny_train(
        dataset="mnist5k",
        train_size=256,
        epochs=4,
        granet=GraNetConfig(init_density=0.8, final_density=0.5, update_interval=2, prune_end=2),
    )
    run = build_run(cfg, device=CPU)
    spe = run.plan.steps_per_epoch
    assert spe == 8
    losses, infos = [], []
    for epoch in range(4):
        sums = Sums.zeros(CPU)
        infos += list(train_steps(run, epoch, sums))
        totals = sums.read()
        assert totals.count == 256
        assert run.engine.step_count == spe * (epoch + 1)
        losses.append(totals.loss)
    assert losses[-1] < 0.7 * losses[0]
    assert all(isinstance(i, StepInfo) for i in infos)
    assert [i.step for i in infos] == list(range(1, 4 * spe + 1))
    assert [i.epoch for i in infos] == [e for e in range(4) for _ in range(spe)]
    last = 4 * spe  # no regrowth at the last step
    assert [i.update is not None for i in infos] == [i.step % 2 == 0 < last - i.step for i in infos]
    assert [i.step for i in infos if i.update is not None] == [
        h["step"] for h in run.engine.history
    ]
    assert run.engine.density() == pytest.approx(0.5, abs=1e-3)
    _assert_masked(run)
    ev = evaluate(run)
    assert ev.count == 1000 and 0.0 <= ev.accuracy <= 1.0
    assert ev.loss == pytest.approx(ev.loss_sum / 1000)
    assert ev.accuracy > 0.5  # it did learn


# ---- 2. the plan ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "batch", "spe"),
    [(4000, 128, 31), (4000, 100, 40), (130, 128, 1), (200, 128, 2), (1000, 64, 16), (8, 8, 1)],
)
def test_plan_counts_global_steps_of_the_global_batch_at_any_worker_count(
    size: int, batch: int, spe: int
) -> None:
    train = small_train(
        global_batch=batch, epochs=3, lr_milestones=(), granet=GraNetConfig(prune_end=2)
    )
    plans = {plan_run(train, size, w) for w in (1, 2, 4, 8)}
    assert plans == {Plan(size, batch, spe, 3 * spe)}


def test_plan_refuses_a_global_batch_that_leaves_a_worker_without_a_sample() -> None:
    train = small_train(global_batch=8, lr_milestones=(), granet=GraNetConfig(prune_end=2))
    assert plan_run(train, 100, 4).steps_per_epoch == 13  # 12 steps of 8, then one of 4
    with pytest.raises(ConfigError, match=r"^global_batch=8 is invalid") as err:
        plan_run(train, 100, 8)
    assert "8 workers" in str(err.value) and "holds 4" in str(err.value)
    with pytest.raises(ConfigError, match="global_batch"):
        plan_run(train.replace(global_batch=4), 5, 8)  # one step of 5 samples for 8 workers
    with pytest.raises(ConfigError, match="global_batch"):
        build_run(tiny_train(global_batch=2, train_size=3), device=CPU, world=4)


# ---- 3. gradient accumulation --------------------------------------------------------------


def _first_step(train: TrainConfig) -> tuple[StepInfo, Tensors, Tensors]:
    run = build_run(train, device=CPU)
    info = next(train_steps(run, 0, Sums.zeros(CPU)))
    return info, _grads(run), _weights(run)


def test_gradient_accumulation_gives_the_same_step() -> None:
    train = tiny_train(dataset="mnist5k", train_size=64)
    initial = _weights(build_run(train, device=CPU))
    info, grads, weights = _first_step(train)
    assert info.share.micro == (32,)
    assert any(not torch.equal(initial[n], t) for n, t in weights.items())  # it stepped
    for max_batch, micro in ((32, (32,)), (16, (16, 16)), (12, (11, 11, 10)), (8, (8,) * 4)):
        got, got_grads, got_weights = _first_step(train.replace(max_batch_per_worker=max_batch))
        assert got.share.micro == micro
        np.testing.assert_array_equal(got.share.indices, info.share.indices)
        torch.testing.assert_close(got.loss, info.loss)
        assert got_grads.keys() == grads.keys()
        torch.testing.assert_close(got_grads, grads, rtol=1e-5, atol=1e-7)
        assert _relative_error(got_grads, grads) < 1e-5
        torch.testing.assert_close(got_weights, weights, rtol=1e-5, atol=1e-7)


# ---- 4. the global-batch recipe on real gloo processes ----------------------------------------

# 150 samples in 5 steps of 30: shares 15/15 on 2 workers, 8/8/7/7 on 4; the workers
# accumulate over micro-batches of at most 7: 5 + 5 + 5 on 2; 4 + 4 on ranks 0 and 1 of 4 but
# a single 7 on ranks 2 and 3 (one synced backward each); the reference doesn't.
GLOO_TRAIN = tiny_train(
    dataset="synthetic_mnist5k",
    train_size=150,
    global_batch=30,
    lr=0.05,
    warmup_epochs=0.5,
    lr_milestones=(1,),
    lr_gamma=0.5,
    sparse_allreduce=False,  # plain DDP: its dense mean gradient is compared with one process's
)
GLOO_MAX_BATCH = 7


def _trace(run: Run) -> dict[str, Any]:
    """Train every epoch of ``run``; what the recipe test compares."""
    lrs = [run.optimizer.param_groups[0]["lr"]]
    out: dict[str, Any] = {"plan": run.plan, "steps": [], "indices": [], "losses": []}
    for epoch in range(run.train.epochs):
        for info in train_steps(run, epoch, Sums.zeros(run.device)):
            lrs.append(run.optimizer.param_groups[0]["lr"])
            out["steps"].append((info.step, info.share.step, info.share.size))
            out["indices"].append(info.share.indices.copy())
            out["losses"].append(float(info.loss) * len(info.share.indices))
            if info.step == 1:
                out["first_weights"] = _weights(run)
                out["first_grads"] = _grads(run)  # DDP's mean over the workers
            if info.update is not None and "first_masks" not in out:
                out["first_masks"] = _masks(run)
    out["lrs"] = lrs[:-1]  # the LR of every step
    out["updates"] = [h["step"] for h in run.engine.history]
    out["masks"] = _masks(run)
    return out


def _gloo_worker(rank: int, port: int, out: str) -> None:
    """One of 4 gloo processes: the run on all 4 (default group), then on ranks 0 and 1
    alone (a group of 2); one spawn for both saves a second start-up of torch."""
    torch.set_num_threads(1)  # 4 processes on 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    try:
        pair = dist.new_group([0, 1])  # every rank creates it, ranks 0 and 1 use it
        train = GLOO_TRAIN.replace(max_batch_per_worker=GLOO_MAX_BATCH)
        run = build_run(train, device=CPU, rank=rank, world=4, wrap=DDP, sync=DistributedSync())
        assert isinstance(run.model, DDP)
        traces = {4: _trace(run)}
        if rank < 2:

            def wrap(net: nn.Module) -> nn.Module:
                return DDP(net, process_group=pair)

            run = build_run(
                train, device=CPU, rank=rank, world=2, wrap=wrap, sync=DistributedSync(pair)
            )
            traces[2] = _trace(run)
        torch.save(traces, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """The traces of a 1-process reference and of every rank of 2 and 4 gloo processes (5
    processes on 2 cores: the tests that use it are marked slow)."""
    out = tmp_path_factory.mktemp("gloo")
    traces = {1: [_trace(build_run(GLOO_TRAIN, device=CPU))]}
    ranks = gloo_workers(_gloo_worker, 4, out)
    return {**traces, 2: [ranks[r][2] for r in range(2)], 4: [ranks[r][4] for r in range(4)]}


@pytest.mark.slow
def test_the_same_steps_lr_and_mask_updates_at_any_number_of_workers(
    gloo: dict[int, list[dict[str, Any]]],
) -> None:
    (ref,) = gloo[1]
    assert ref["plan"] == Plan(150, 30, 5, 10)
    assert ref["steps"] == [(e * 5 + s + 1, s, 30) for e in range(2) for s in range(5)]
    warm = [0.05 * f for f in (0.4, 0.8, 1.0, 1.0, 1.0)]  # 2.5 warm-up steps
    assert ref["lrs"] == pytest.approx(warm + [0.025] * 5)
    assert ref["updates"] == [2, 4, 6, 8]
    for world in (2, 4):
        for trace in gloo[world]:
            assert trace["plan"] == ref["plan"]
            assert trace["steps"] == ref["steps"]
            assert trace["lrs"] == ref["lrs"]
            assert trace["updates"] == ref["updates"]
        for s, indices in enumerate(ref["indices"]):  # the same samples make every step
            dealt = np.concatenate([t["indices"][s] for t in gloo[world]])
            np.testing.assert_array_equal(dealt, indices)
            loss = sum(t["losses"][s] for t in gloo[world])  # summed over the step's samples
            if s == 0:
                assert loss == pytest.approx(ref["losses"][0], rel=1e-5)


@pytest.mark.slow
def test_workers_agree_exactly_and_match_one_process(
    gloo: dict[int, list[dict[str, Any]]],
) -> None:
    (ref,) = gloo[1]
    for world in (2, 4):
        first = gloo[world][0]
        # bit-identical masks on every worker (docs/algorithm.md section 5)
        for other in gloo[world][1:]:
            for key in ("first_masks", "masks"):
                for name, mask in first[key].items():
                    assert torch.equal(mask, other[key][name]), (world, key, name)
            for key in ("first_grads", "first_weights"):
                for name, tensor in first[key].items():
                    assert torch.equal(tensor, other[key][name]), (world, key, name)
        # the DDP mean of the step-normalized losses is the step's mean gradient (uneven
        # shares and micro-batches included): the first step is one process's, up to the
        # summation order
        assert _relative_error(first["first_grads"], ref["first_grads"]) < 1e-5
        torch.testing.assert_close(
            first["first_weights"], ref["first_weights"], rtol=1e-4, atol=1e-6
        )
        masks, reference = first["first_masks"], ref["first_masks"]
        agree = sum(int((masks[n] == reference[n]).sum()) for n in reference)
        total = sum(m.numel() for m in reference.values())
        assert agree >= 0.999 * total, (world, total - agree)
        # ... and the later updates did change the masks
        assert any(not torch.equal(m, first["masks"][n]) for n, m in masks.items())


# ---- 5. run_epochs with hooks, and a mid-epoch resume -----------------------------------------

HOOKS_TRAIN = tiny_train(
    train_size=96,
    global_batch=16,
    epochs=3,
    granet=GraNetConfig(
        init_density=0.5, final_density=0.2, update_interval=4, prune_start=0, prune_end=2
    ),
)  # 6 steps per epoch, 18 in all


class _Stop(Exception):
    """Ends a run from a hook, as a crashed worker would."""


class _Recorder(Hooks):
    def __init__(self, on_checkpoint: Callable[[Run, Position], None] | None = None) -> None:
        self.steps: list[StepInfo] = []
        self.checkpoints: list[Position] = []
        self.epochs: list[tuple[dict[str, Any], Position, bool]] = []
        self._on_checkpoint = on_checkpoint

    def on_step(self, run: Run, info: StepInfo) -> None:
        self.steps.append(info)

    def on_checkpoint(self, run: Run, position: Position) -> None:
        self.checkpoints.append(position)
        if self._on_checkpoint is not None:
            self._on_checkpoint(run, position)

    def on_epoch(
        self, run: Run, metrics: dict[str, Any], position: Position, checkpoint: bool
    ) -> None:
        self.epochs.append((metrics, position, checkpoint))


def _run_epochs(run: Run, hooks: Hooks, start: Position | None = None) -> Position:
    return run_epochs(run, hooks, start=start, checkpoint_every=2, checkpoint_every_steps=4)


@pytest.fixture(scope="module")
def uninterrupted() -> tuple[Run, _Recorder, Position]:
    run = build_run(HOOKS_TRAIN, device=CPU)
    hooks = _Recorder()
    return run, hooks, _run_epochs(run, hooks)


def test_run_epochs_calls_the_hooks(uninterrupted: tuple[Run, _Recorder, Position]) -> None:
    run, hooks, final = uninterrupted
    assert run.plan.steps_per_epoch == 6 and run.engine.step_count == 18
    assert [i.step for i in hooks.steps] == list(range(1, 19))
    for info in hooks.steps:
        (expected,) = epoch_shares(
            96, 16, seed=0, epoch=info.epoch, rank=0, world=1, start_step=info.share.step
        )[:1]
        assert (info.step - 1) // 6 == info.epoch and (info.step - 1) % 6 == info.share.step
        assert info.share.size == 16 and info.share.micro == (16,)
        np.testing.assert_array_equal(info.share.indices, expected.indices)
        assert isinstance(info.loss, torch.Tensor) and info.loss.device == run.device
        assert info.loss.dim() == 0 and bool(torch.isfinite(info.loss))
    assert [i.step for i in hooks.steps if i.update is not None] == [4, 8, 12, 16]
    # mid-epoch checkpoints every 4 global steps, never on an epoch's last step (step 12)
    assert [(p.epoch, p.step_in_epoch) for p in hooks.checkpoints] == [(0, 4), (1, 2), (2, 4)]
    assert [p.totals.count for p in hooks.checkpoints] == [64, 32, 64]
    assert [len(p.epochs) for p in hooks.checkpoints] == [0, 1, 2]
    # an epoch checkpoint after every 2nd epoch and the last one
    assert [c for _, _, c in hooks.epochs] == [False, True, True]
    assert [(p.epoch, p.step_in_epoch) for _, p, _ in hooks.epochs] == [(1, 0), (2, 0), (3, 0)]
    metrics = [m for m, _, _ in hooks.epochs]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert [m["step"] for m in metrics] == [6, 12, 18]
    assert [m["mask_updates"] for m in metrics] == [1, 3, 4]
    assert all(np.isfinite(m["train_loss"]) and 0 <= m["val_accuracy"] <= 1 for m in metrics)
    for m in metrics:  # the epoch's train loss is the mean of its steps' losses
        losses = [float(i.loss) for i in hooks.steps if i.epoch == m["epoch"] - 1]
        assert m["train_loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert final.epoch == 3 and final.step_in_epoch == 0
    assert final.totals.count == 0 and final.epochs == metrics
    _assert_masked(run)


def test_a_run_resumed_mid_epoch_trains_the_remaining_steps_bit_for_bit(
    uninterrupted: tuple[Run, _Recorder, Position], tmp_path: Path
) -> None:
    reference, ref_hooks, _ = uninterrupted
    uri = str(tmp_path / "checkpoint")

    def save_and_stop(run: Run, position: Position) -> None:
        if (position.epoch, position.step_in_epoch) == (1, 2):
            save_checkpoint(run, position, uri, [rng_state()])
            raise _Stop

    with pytest.raises(_Stop):
        _run_epochs(build_run(HOOKS_TRAIN, device=CPU), _Recorder(save_and_stop))

    run = build_run(HOOKS_TRAIN, device=CPU)
    resumed = restore(run, uri)
    start = resumed.position
    assert (start.epoch, start.step_in_epoch, start.totals.count) == (1, 2, 32)
    assert len(start.epochs) == 1 and run.engine.step_count == 8
    hooks = _Recorder()
    final = _run_epochs(run, hooks, start=start)
    assert [i.step for i in hooks.steps] == list(range(9, 19))  # from the engine's count on
    assert [i.share.step for i in hooks.steps if i.epoch == 1] == [2, 3, 4, 5]  # the rest only
    assert [(p.epoch, p.step_in_epoch) for p in hooks.checkpoints] == [(2, 4)]
    assert [m["epoch"] for m, _, _ in hooks.epochs] == [2, 3]
    ref_metrics = [m for m, _, _ in ref_hooks.epochs]
    speed = "samples_per_second"  # the only wall-clock number
    assert {k: v for k, v in final.epochs[0].items() if k != speed} == {
        k: v for k, v in ref_metrics[0].items() if k != speed
    }
    assert final.epochs[1]["train_loss"] == pytest.approx(ref_metrics[1]["train_loss"], rel=1e-9)
    for later in (1, 2):
        for key in ("step", "val_loss", "val_accuracy", "density", "mask_updates"):
            assert final.epochs[later][key] == ref_metrics[later][key], (later, key)
    weights = _weights(run)
    for name, tensor in _weights(reference).items():  # bit for bit
        assert torch.equal(weights[name], tensor), name
    for name, mask in reference.engine.masks.items():
        assert torch.equal(run.engine.masks[name], mask), name
    assert run.engine.history == reference.engine.history


def test_a_loss_diverged_on_any_worker_stops_every_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The finiteness check reads the sums over all workers: a worker whose own loss is
    finite raises too, instead of waiting in the next collective for one that stopped."""
    run = build_run(tiny_train(), device=CPU)

    def another_worker_diverged(values: list[float]) -> list[float]:
        loss, *rest = values
        return [loss + float("nan"), *rest]  # + another worker's NaN loss sum

    monkeypatch.setattr("granet_ray.recipe.sum_across_workers", another_worker_diverged)
    hooks = _Recorder()
    with pytest.raises(FloatingPointError, match="training loss of epoch 1 is nan"):
        run_epochs(run, hooks)
    assert len(hooks.steps) == 3 and all(bool(torch.isfinite(i.loss)) for i in hooks.steps)
    assert hooks.epochs == []


# ---- 6. precision on the CPU ------------------------------------------------------------------


def test_auto_precision_is_fp32_on_the_cpu() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    for precision in ("fp32", "fp16", "bf16"):
        assert resolve_precision(precision, CPU) == precision
    run = build_run(tiny_train(precision="auto"), device=CPU)
    assert run.precision == "fp32" and run.scaler is None


def test_bf16_trains_under_autocast() -> None:
    run = build_run(tiny_train(precision="bf16"), device=CPU)
    assert run.precision == "bf16" and run.scaler is None
    dtypes: list[torch.dtype] = []
    run.net.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    before = _weights(run)
    infos = list(train_steps(run, 0, Sums.zeros(CPU)))
    assert dtypes == [torch.bfloat16] * 3
    assert all(i.loss.dtype == torch.float32 and bool(torch.isfinite(i.loss)) for i in infos)
    assert [i.update is not None for i in infos] == [False, True, False]
    assert run.engine.step_count == 3
    assert all(p.dtype == torch.float32 for p in run.net.parameters())  # fp32 master weights
    assert any(not torch.equal(before[n], t) for n, t in _weights(run).items())
    _assert_masked(run)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")
def test_fp16_uses_a_grad_scaler_that_skips_overflowing_steps() -> None:
    run = build_run(tiny_train(precision="fp16"), device=CPU)
    assert run.precision == "fp16"
    assert isinstance(run.scaler, torch.amp.GradScaler) and run.scaler._device == "cpu"
    state = run.scaler.state_dict()
    run.scaler.load_state_dict({**state, "scale": 2.0**60})  # the fp16 gradients overflow
    before = _weights(run)
    steps = train_steps(run, 0, Sums.zeros(CPU))
    info = next(steps)
    assert bool(torch.isfinite(info.loss))
    for name, tensor in _weights(run).items():  # the step was skipped
        assert torch.equal(tensor, before[name]), name
    assert not run.optimizer.state  # no momentum yet
    assert run.scaler.get_scale() == 2.0**59  # backed off
    assert run.engine.step_count == 1
    run.scaler.load_state_dict({**run.scaler.state_dict(), "scale": 1.0})
    info = next(steps)  # a mask update, with finite gradients
    assert info.update is not None and bool(torch.isfinite(info.loss))
    assert any(not torch.equal(before[n], t) for n, t in _weights(run).items())
    assert all(bool(torch.isfinite(t).all()) for t in _weights(run).values())
    _assert_masked(run)


# ---- 7. no host syncs between mask updates ----------------------------------------------------

SYNCS = ("item", "__bool__", "__float__", "__int__", "tolist")  # each waits for the device


def test_no_host_sync_between_mask_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    train = tiny_train(
        train_size=128,
        global_batch=16,
        max_batch_per_worker=6,
        granet=GraNetConfig(
            init_density=0.5, final_density=0.2, update_interval=3, prune_start=0, prune_end=2
        ),
    )
    run = build_run(train, device=CPU)
    interval = train.granet.update_interval
    allowed = [False]
    tripped: list[str] = []
    real_step = run.engine.step

    def engine_step() -> dict[str, Any] | None:
        allowed[0] = (run.engine.step_count + 1) % interval == 0  # an update step
        try:
            return real_step()
        finally:
            allowed[0] = False

    def guard(name: str) -> Callable[..., Any]:
        real = getattr(torch.Tensor, name)

        def checked(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = Path(sys._getframe(1).f_code.co_filename).as_posix()
            if not allowed[0] and "/torch/utils/data/" not in caller:  # the DataLoader may
                tripped.append(name)
                raise AssertionError(f"host sync: Tensor.{name} outside a mask update")
            return real(self, *args, **kwargs)

        return checked

    monkeypatch.setattr(run.engine, "step", engine_step)
    guards = {name: guard(name) for name in SYNCS}
    infos = []
    sums = Sums.zeros(CPU)
    with monkeypatch.context() as patch:
        for name, checked in guards.items():
            patch.setattr(torch.Tensor, name, checked)
        for epoch in range(train.epochs):
            for info in train_steps(run, epoch, sums):
                infos.append((info.step, info.update is not None))
    assert not tripped
    assert len(infos) == 16
    assert [s for s, u in infos if u] == [s for s, _ in infos if s % interval == 0]
    assert sums.read().count == 2 * 128  # both epochs, read after the loop
