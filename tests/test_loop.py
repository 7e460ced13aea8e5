"""The plain training loop: LR warm-up and milestones, the optimizer, and one epoch with the
GraNet hook called once per batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from granet_ray.config import GraNetConfig, TrainConfig
from granet_ray.loop import (
    StepInfo,
    build_lr_schedule,
    build_optimizer,
    evaluate,
    lr_factor,
    train_epoch,
)
from granet_ray.sparsity import GraNet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(**kw) -> TrainConfig:
    base = {"epochs": 10, "lr": 0.1, "granet": GraNetConfig(prune_end=5, update_interval=2)}
    base.update(kw)
    return TrainConfig(**base)


def test_lr_factor_warmup_then_milestones() -> None:
    cfg = _cfg(warmup_epochs=2, lr_milestones=(5, 8), lr_gamma=0.1)
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
    cfg = _cfg(lr_milestones=(3,), lr_gamma=0.5)
    assert [lr_factor(s, cfg, 10) for s in (0, 29, 30, 99)] == [1.0, 1.0, 0.5, 0.5]
    assert lr_factor(0, _cfg(), 10) == 1.0  # no milestones, no warm-up: constant


def test_lr_schedule_drives_the_optimizer_per_step() -> None:
    cfg = _cfg(warmup_epochs=1, lr_milestones=(2,), lr_gamma=0.1)
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
    sgd = build_optimizer(model, _cfg(momentum=0.9, nesterov=True, weight_decay=5e-4))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["momentum"] == 0.9
    no_norm_wd = build_optimizer(model, _cfg(weight_decay=1e-4, weight_decay_norm=False))
    by_id = {id(p): g["weight_decay"] for g in no_norm_wd.param_groups for p in g["params"]}
    norm_params = {id(p) for p in model[1].parameters()}
    for p in model.parameters():  # spec 7: no weight decay on norm layers (biases keep it)
        assert by_id[id(p)] == (0.0 if id(p) in norm_params else 1e-4)
    assert isinstance(build_optimizer(model, _cfg(optimizer="adam")), torch.optim.Adam)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, :4].sum(dim=1) > x[:, 4:].sum(dim=1)).long()
    return TensorDataset(x, y)


def test_train_epoch_decreases_loss_and_steps_the_engine_once_per_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    cfg = _cfg(
        epochs=6,
        lr=0.1,
        granet=GraNetConfig(init_density=0.8, final_density=0.5, update_interval=2, prune_end=3),
    )
    loader = DataLoader(_data(), batch_size=16, shuffle=False)  # 4 batches
    opt = build_optimizer(model, cfg)
    sched = build_lr_schedule(opt, cfg, steps_per_epoch=4)
    engine = GraNet(model, opt, cfg.granet, total_steps=24, steps_per_epoch=4)
    losses, infos = [], []
    for epoch in range(6):
        result = train_epoch(
            model,
            loader,
            opt,
            sched,
            engine,
            device=torch.device("cpu"),
            on_step=infos.append,
        )
        assert result.count == 64
        assert engine.step_count == 4 * (epoch + 1)
        losses.append(result.loss)
    assert losses[-1] < 0.7 * losses[0]
    assert [i.step for i in infos] == list(range(1, 25))
    assert all(isinstance(i, StepInfo) for i in infos)
    assert [i.step for i in infos if i.update is not None] == [h["step"] for h in engine.history]
    assert [h["step"] for h in engine.history][:11] == list(range(2, 23, 2))
    assert engine.density() == pytest.approx(0.5, abs=1 / 320)
    for n, p in engine.params.items():
        assert bool((p.detach()[~engine.masks[n]] == 0).all())
    ev = evaluate(model, loader, device=torch.device("cpu"))
    assert ev.count == 64 and 0.0 <= ev.accuracy <= 1.0
    assert ev.loss == pytest.approx(ev.loss_sum / 64)
