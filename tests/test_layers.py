"""What gets pruned in any architecture (``sparsity/layers.py`` and the engine over it):
attention projections, one mask per parameter however many modules share it (issue 21.4),
frozen weights never prunable (issue 21.5), weights kept dense by name pattern, weights tied
to an embedding; ERK, FLOPs, the summary and AdamW's state over all of them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from granet_ray.config import ConfigError, GraNetConfig, parse_value
from granet_ray.sparsity import GraNet, erk_densities
from granet_ray.sparsity.layers import prunable_parameters, weight_table

pytestmark = pytest.mark.usefixtures("one_thread")

STATIC = GraNetConfig(method="static", final_density=0.1, prune_end=1)


def engine_for(model: nn.Module, config: GraNetConfig = STATIC, optimizer: str = "sgd") -> GraNet:
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=0.01)
    else:
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return GraNet(model, opt, config, total_steps=10, steps_per_epoch=5)


class Tied(nn.Module):
    """Two Linear layers sharing one weight, and a third of their size."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight
        self.c = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(torch.relu(self.a(x))))


def test_a_weight_shared_by_two_modules_has_one_mask_and_its_reported_density() -> None:
    """Issue 21.4: one mask per parameter; the weight's zeros are what the engine reports."""
    torch.manual_seed(0)
    model = Tied()
    engine = engine_for(model)
    assert set(engine.masks) == {"a.weight", "c.weight"}
    weight = model.a.weight
    active = int((weight != 0).sum())
    assert active == engine.active_counts()["a.weight"]
    assert active / weight.numel() == pytest.approx(engine.summary()["layers"][0]["density"])
    total = sum(int((p != 0).sum()) for p in (model.a.weight, model.c.weight))
    assert total / (2 * 64 * 64) == pytest.approx(engine.density())
    rows = {r["name"]: r for r in engine.summary()["layers"]}
    assert set(rows) == {"a.weight", "c.weight"} and rows["a.weight"]["shared"] == ["b"]


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(32, 64)
        self.frozen.requires_grad_(False)
        self.body = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.frozen(x))))


def test_frozen_weights_are_not_prunable_and_the_summary_says_so() -> None:
    """Issue 21.5: a weight without gradients is never masked (regrowth could only grow it
    into positions that never train); the summary lists it as dense: frozen."""
    torch.manual_seed(0)
    model = Frozen()
    before = model.frozen.weight.detach().clone()
    config = GraNetConfig(init_density=0.5, final_density=0.2, update_interval=1, prune_end=1)
    engine = engine_for(model, config)
    assert "frozen.weight" not in engine.masks
    for _ in range(6):  # prune and regrow with real gradients
        model.zero_grad()
        model(torch.randn(8, 32)).square().mean().backward()
        engine.optimizer.step()
        engine.step()
    assert torch.equal(model.frozen.weight, before)
    weights = dict(model.named_parameters())
    for name, mask in engine.masks.items():  # the masks are the weights' zeros
        assert not weights[name][~mask].any()
    rows = {r["name"]: r for r in engine.summary()["layers"]}
    assert rows["frozen.weight"]["dense"] == "frozen" and rows["frozen.weight"]["density"] == 1.0


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.self_attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.cross = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 50, bias=False)
        self.head.weight = self.embed.weight  # tied to the embedding: stays dense

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.self_attn(x, x, x, need_weights=False)[0]
        x = x + self.cross(x, memory, memory, need_weights=False)[0]
        return self.head(self.norm(x))


def test_attention_projections_are_prunable_tensors_and_embeddings_never() -> None:
    table = weight_table(Attention())
    assert {n: (w.kind, w.dense) for n, w in table.items()} == {
        "embed.weight": ("linear", "shared with embed (Embedding)"),
        "self_attn.in_proj_weight": ("attention", None),
        "self_attn.out_proj.weight": ("linear", None),
        "cross.q_proj_weight": ("attention", None),
        "cross.k_proj_weight": ("attention", None),
        "cross.v_proj_weight": ("attention", None),
        "cross.out_proj.weight": ("linear", None),
    }
    shapes = {n: tuple(w.param.shape) for n, w in table.items() if w.prunable}
    densities = erk_densities(shapes, 0.1)
    assert set(densities) == set(shapes) and 0 < densities["self_attn.in_proj_weight"] < 1


def test_attention_flops_summary_and_adamw_state_follow_the_masks() -> None:
    torch.manual_seed(0)
    model = Attention()
    engine = engine_for(model, optimizer="adamw")
    tokens, memory = torch.randint(50, (2, 6)), torch.randn(2, 5, 16)
    model(tokens, memory).square().mean().backward()
    engine.optimizer.step()
    engine.step()
    flops = engine._flops.flops
    assert flops["self_attn.in_proj_weight"] == 2 * 96 * 32 * 6  # q, k and v over 6 tokens
    assert flops["self_attn.out_proj.weight"] == 2 * 32 * 32 * 6
    assert flops["cross.q_proj_weight"] == 2 * 32 * 32 * 6
    assert flops["cross.k_proj_weight"] == 2 * 32 * 16 * 5  # keys over the 5 memory positions
    assert flops["embed.weight"] == 2 * 50 * 32 * 6  # the tied head, dense
    summary = engine.summary()
    assert summary["inference_flops"] is not None and summary["inference_flops"] < 1
    rows = {r["name"]: r for r in summary["layers"]}
    assert rows["embed.weight"]["dense"] == "shared with embed (Embedding)"
    state = engine.optimizer.state[model.self_attn.in_proj_weight]
    inactive = ~engine.masks["self_attn.in_proj_weight"]
    assert inactive.any() and not state["exp_avg"][inactive].any()
    assert not model.self_attn.in_proj_weight[inactive].any()


class Patched(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1))
        self.head = nn.Linear(16, 10)


def test_keep_dense_patterns_dense_first_and_last_with_their_reasons() -> None:
    model = Patched()
    table = weight_table(model, keep_dense=("patch", "body.1.*"), dense_last=True)
    assert {n: w.dense for n, w in table.items()} == {
        "patch.weight": "keep_dense 'patch'",
        "body.0.weight": None,
        "body.1.weight": "keep_dense 'body.1.*'",
        "head.weight": "dense_last",
    }
    assert list(prunable_parameters(model, dense_first=True)) == [
        "body.0.weight",
        "body.1.weight",
        "head.weight",
    ]
    config = GraNetConfig(
        method="static", final_density=0.1, prune_end=1, keep_dense="patch,head.*"
    )
    assert config.keep_dense == ("patch", "head.*")
    assert parse_value("keep_dense", "*.attn.*,head") == ["*.attn.*", "head"]  # --keep-dense
    engine = engine_for(model, config)
    assert set(engine.masks) == {"body.0.weight", "body.1.weight"}
    rows = {r["name"]: r["dense"] for r in engine.summary()["layers"]}
    assert (
        rows["patch.weight"] == "keep_dense 'patch'"
        and rows["head.weight"] == "keep_dense 'head.*'"
    )
    with pytest.raises(ConfigError, match="'pach' matches no"):
        weight_table(model, keep_dense=("pach",))
