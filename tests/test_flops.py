"""FLOPs by hand (docs/algorithm.md section 6): dense forward FLOPs per layer, inference FLOPs
relative to dense, and training FLOPs as the step average of sum_l f_l d_l(t) / sum_l f_l."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from granet_ray.config import GraNetConfig
from granet_ray.sparsity import GraNet, forward_flops, relative_flops
from granet_ray.sparsity.flops import FlopsRecorder

pytestmark = pytest.mark.usefixtures("one_thread")


def _flops_of(module: nn.Module, x: torch.Tensor) -> float:
    return forward_flops(module, module(x))


def test_conv_forward_flops_by_hand() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # 2 * (8 * 3 * 3 * 3) weights * (8 * 8) output positions
    assert _flops_of(conv, torch.zeros(2, 3, 8, 8)) == 2 * 216 * 64
    strided = nn.Conv2d(4, 6, 3, stride=2, padding=1)  # 8x8 -> 4x4
    assert _flops_of(strided, torch.zeros(1, 4, 8, 8)) == 2 * (6 * 4 * 9) * 16
    grouped = nn.Conv2d(4, 8, 3, groups=2, bias=False)  # weight (8, 2, 3, 3); 6x6 -> 4x4
    assert _flops_of(grouped, torch.zeros(3, 4, 6, 6)) == 2 * (8 * 2 * 9) * 16
    conv1d = nn.Conv1d(2, 5, 3)  # length 10 -> 8
    assert _flops_of(conv1d, torch.zeros(1, 2, 10)) == 2 * 30 * 8


def test_linear_forward_flops_by_hand() -> None:
    fc = nn.Linear(32, 10)
    assert _flops_of(fc, torch.zeros(4, 32)) == 2 * 320
    assert _flops_of(fc, torch.zeros(4, 7, 32)) == 2 * 320 * 7  # per token of a sequence


def test_relative_flops() -> None:
    flops = {"a": 100.0, "b": 300.0}
    assert relative_flops(flops, {"a": 1.0, "b": 1.0}) == 1.0
    assert relative_flops(flops, {"a": 0.5, "b": 0.1}) == pytest.approx((50 + 30) / 400)
    assert relative_flops(flops, {"b": 0.0}) == pytest.approx(0.25)  # missing = dense


def test_recorder_measures_each_layer_once_on_the_first_forward() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 2))
    rec = FlopsRecorder(model)
    assert rec.flops == {}
    model(torch.zeros(2, 3, 4, 4))
    expected = {"0.weight": 2 * 108 * 16, "2.weight": 2 * 128}
    assert rec.flops == expected
    model(torch.zeros(2, 3, 4, 4))
    assert rec.flops == expected


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 216 weights x 36 positions
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(288, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


HAND = {"0.weight": 2 * 216 * 36, "3.weight": 2 * 288 * 16, "5.weight": 2 * 64}


def _engine(
    model: nn.Module, config: GraNetConfig, total: int = 30
) -> tuple[GraNet, torch.optim.Optimizer]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return GraNet(model, opt, config, total_steps=total, steps_per_epoch=5), opt


def test_inference_flops_dense_model_is_one() -> None:
    model = _model()
    engine, _ = _engine(model, GraNetConfig(method="static", final_density=1.0))
    assert engine.inference_flops() is None  # no forward pass yet
    model(torch.zeros(1, 3, 6, 6))
    assert engine.inference_flops() == 1.0
    assert engine.summary()["inference_flops"] == 1.0


@pytest.mark.parametrize("dense_first", [False, True])
def test_inference_flops_sparse_by_hand(dense_first: bool) -> None:
    model = _model()
    config = GraNetConfig(method="static", final_density=0.2, dense_first=dense_first)
    engine, _ = _engine(model, config)
    model(torch.zeros(1, 3, 6, 6))
    dens = {n: float(m.sum()) / m.numel() for n, m in engine.masks.items()}
    if dense_first:
        assert "0.weight" not in dens
    expected = sum(f * dens.get(n, 1.0) for n, f in HAND.items()) / sum(HAND.values())
    assert engine.inference_flops() == pytest.approx(expected, rel=1e-12)
    assert engine.inference_flops() < 1.0
    rows = {r["name"]: r for r in engine.summary()["layers"]}
    assert {n: r["flops"] for n, r in rows.items()} == HAND


def test_training_flops_is_the_step_average() -> None:
    model = _model()
    config = GraNetConfig(
        method="gmp", final_density=0.1, update_interval=3, prune_start=0, prune_end=4
    )
    engine, opt = _engine(model, config, total=25)
    assert engine.training_flops() is None
    g = torch.Generator().manual_seed(0)
    per_step = []
    for _ in range(25):
        x, y = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 4, (4,), generator=g)
        # the density that this step's forward pass runs at: the masks before its update
        dens = {n: float(m.sum()) / m.numel() for n, m in engine.masks.items()}
        per_step.append(sum(f * dens[n] for n, f in HAND.items()) / sum(HAND.values()))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        engine.step()
    assert len(set(per_step)) > 3  # the density really changed along the way
    assert engine.training_flops() == pytest.approx(sum(per_step) / 25, rel=1e-12)
    assert engine.inference_flops() < engine.training_flops() < 1.0
