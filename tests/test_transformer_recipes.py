"""Recipes for transformers: AdamW with decoupled weight decay (none on norms, biases and
embeddings), the cosine LR schedule in global steps, and gradient clipping by the global norm
of the gradient that trains, in every command, grid file and preset."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from granet_ray.config import GraNetConfig, TrainConfig, override
from granet_ray.recipe import build_optimizer, clip_gradients, lr_factor
from granet_ray.sparsity import GraNet

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.pos_embed = nn.Parameter(torch.zeros(4, 8))
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(x) + self.pos_embed)
        return self.head(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_adamw_decays_only_matrices_that_are_not_norms_or_embeddings() -> None:
    model = Net()
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.05))
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {
        names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]
    }
    assert decayed == {"attn.in_proj_weight", "attn.out_proj.weight", "head.weight"}
    assert optimizer.param_groups[0]["weight_decay"] == 0.05


def test_cosine_schedule_warms_up_then_anneals_to_lr_min_at_the_last_step() -> None:
    cfg = TrainConfig(
        epochs=4, lr=0.1, lr_min=0.01, lr_schedule="cosine", warmup_epochs=1, lr_milestones=()
    )
    spe = 10  # 40 global steps, 10 of warm-up
    factors = [lr_factor(s, cfg, spe) for s in range(40)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[39] == pytest.approx(0.1)  # lr_min / lr
    middle = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 29))
    assert factors[25] == pytest.approx(middle)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    step = TrainConfig(epochs=4, lr_milestones=(2,), lr_gamma=0.1)
    assert [lr_factor(s, step, spe) for s in (19, 20)] == pytest.approx([1.0, 0.1])


def test_the_recipe_fields_are_one_language_and_rescale_with_the_batch() -> None:
    train = override(
        TrainConfig(lr=0.1, lr_min=0.01),
        {"optimizer": "adamw", "lr_schedule": "cosine", "grad_clip": 1.0, "global_batch": 256},
    )
    assert (train.lr, train.lr_min) == pytest.approx((0.2, 0.02))
    assert (train.optimizer, train.lr_schedule, train.grad_clip) == ("adamw", "cosine", 1.0)
    assert TrainConfig.from_dict(train.to_dict()) == train


def test_grad_clip_uses_the_norm_of_the_gradient_that_trains() -> None:
    """Inactive weights' gradients (which only rank regrowth) do not count in the norm, so
    it is the same with and without the sparse all-reduce; every gradient is scaled alike,
    which keeps the regrowth ranking."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = GraNetConfig(method="static", final_density=0.25, prune_end=1)
    engine = GraNet(model, optimizer, config, total_steps=4, steps_per_epoch=2)
    model(torch.randn(8, 16)).square().sum().backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    trained = torch.linalg.vector_norm(
        torch.stack(
            [
                torch.linalg.vector_norm(g * engine.masks[n] if n in engine.masks else g)
                for n, g in before.items()
            ]
        )
    )
    assert trained > 0.5
    clip_gradients(optimizer, engine, 0.5)
    scale = 0.5 / (float(trained) + 1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, before[name] * scale)
    clip_gradients(optimizer, engine, 1e6)  # below the limit: unchanged
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, before[name] * scale)
