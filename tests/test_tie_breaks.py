"""Tie-breaks by random key (docs/algorithm.md section 5, version 2.1): where equal scores
straddle a cut, the positions kept among the tied are a uniform draw from a stream seeded by
(run seed, update index, layer name), identical on every worker and device. Checked where ties
are massive (a conv layer whose gradients are all zero, one with bf16-rounded gradients): the
chosen spread over output channels as a uniform draw would (chi-square), where the old
lowest-index rule piled them onto the first channels; the keys are a fixed integer hash; the
threshold methods of the CPU and of CUDA agree; two gloo workers get identical masks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from processes import gloo_workers
from torch import nn

from granet_ray.config import GraNetConfig
from granet_ray.distributed import DistributedSync
from granet_ray.sparsity import GraNet, criteria
from granet_ray.sparsity.criteria import (
    TieBreak,
    global_magnitude_prune,
    keep_top,
    kth_largest,
    ordered_bits,
    prune_and_regrow,
)
from granet_ray.sparsity.seeding import layer_seed, random_keys

pytestmark = pytest.mark.usefixtures("one_thread")

TIES = TieBreak(seed=0, update=3)
Z_999 = 3.090  # the standard normal's 0.999 quantile


# ---- the keys ----------------------------------------------------------------------------------


def _hash32(x: int) -> int:
    """The reference 32-bit hash, in plain Python integers."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**63 - 1, layer_seed(7, 3, "a")])
def test_random_keys_are_a_fixed_integer_hash_of_seed_and_position(seed: int) -> None:
    keys = random_keys(seed, 1000)
    assert keys.dtype == torch.int64 and keys.shape == (1000,)
    low, high = seed & 0xFFFFFFFF, seed >> 32
    expected = [
        _hash32(_hash32((i + low) & 0xFFFFFFFF) ^ (high & 0xFFFFFFFF)) >> 1 for i in range(1000)
    ]
    assert keys.tolist() == expected
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**31


def test_keys_differ_by_update_layer_and_purpose_and_repeat_exactly() -> None:
    base = TIES.keys("conv.weight", "grow", 500)
    assert torch.equal(base, TieBreak(seed=0, update=3).keys("conv.weight", "grow", 500))
    for other in (
        TieBreak(seed=0, update=4).keys("conv.weight", "grow", 500),
        TieBreak(seed=1, update=3).keys("conv.weight", "grow", 500),
        TIES.keys("fc.weight", "grow", 500),
        TIES.keys("conv.weight", "drop", 500),
    ):
        assert (other == base).float().mean() < 0.01
    assert torch.unique(base).numel() >= 499  # 31-bit keys: collisions are rare


def test_ordered_bits_keep_the_float32_order() -> None:
    values = [-math.inf, -2.5, -1.0, -1e-30, -0.0, 0.0, 1e-45, 1e-30, 0.5, 1.0, 3e38, math.inf]
    bits = ordered_bits(torch.tensor(values)).tolist()
    assert bits == sorted(bits) and bits[4] == bits[5]  # -0.0 ties with 0.0
    assert len(set(bits)) == len(values) - 1
    assert all(0 <= b < 2**32 for b in bits)
    assert ordered_bits(torch.tensor([math.nan])).item() > bits[-1]


def test_keep_top_with_keys_ties_go_to_the_larger_key_then_the_lower_index() -> None:
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    keys = torch.tensor([9, 1, 5, 7, 9, 5])
    assert keep_top(scores, 2, keys).tolist() == [False, False, True, True, False, False]
    assert keep_top(scores, 3, keys).tolist() == [False, False, True, True, False, True]
    assert keep_top(scores, 5, keys).tolist() == [True, True, True, True, False, True]
    assert keep_top(-scores, 1, keys).tolist() == [False, False, False, False, True, False]


@pytest.mark.parametrize("seed", range(3))
def test_the_cpu_and_cuda_threshold_methods_pick_the_same_tied_positions(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (6, 50), generator=g).float()  # 4 values: masses of ties
    keys = TIES.keys(f"layer{seed}", "grow", scores.numel())
    for k in range(scores.numel() + 1):
        by_kthvalue = keep_top(scores, k, keys, method="kthvalue")
        assert torch.equal(by_kthvalue, keep_top(scores, k, keys, method="topk")), k
        assert int(by_kthvalue.sum()) == k


def test_kth_largest_of_the_scores_with_their_keys_is_exact() -> None:
    """The composite of score and key, as ``keep_top`` ranks it, has one k-th value."""
    scores = torch.zeros(100)
    order = (ordered_bits(scores) << 31) | TIES.keys("x", "grow", 100)
    for k in (1, 37, 100):
        assert kth_largest(order, k, method="kthvalue") == kth_largest(order, k, method="topk")


# ---- massive ties spread like a uniform draw ---------------------------------------------------


def _chi_square_critical(df: int, z: float = Z_999) -> float:
    """The chi-square quantile of ``df`` degrees of freedom at the normal quantile ``z``
    (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi_square(chosen: torch.Tensor, tied: torch.Tensor, groups: int) -> tuple[float, int]:
    """Pearson's statistic of the chosen positions over ``groups`` equal groups of output
    channels against a uniform draw among the tied positions; and its degrees of freedom."""
    per_group = lambda m: m.reshape(groups, -1).sum(dim=1).double()  # noqa: E731
    observed, available = per_group(chosen), per_group(tied)
    expected = observed.sum() * available / available.sum()
    return float(((observed - expected) ** 2 / expected).sum()), groups - 1


def _layer(shape: tuple[int, ...], density: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Weights (zero where inactive) and a mask with exactly round(density * n) active."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: round(density * n)]] = True
    mask = mask.view(shape)
    return torch.randn(shape, generator=g) * mask, mask


def _regrown(weights: torch.Tensor, grads: torch.Tensor, mask: torch.Tensor, fraction: float):
    """The regrowth's new mask and its kept (not removed) positions, by the library."""
    new = prune_and_regrow({"w": weights}, {"w": grads}, {"w": mask}, fraction, TIES)["w"]
    active = int(mask.sum())
    r = math.ceil(fraction * active)
    kept = keep_top(
        torch.where(mask, weights.abs(), -1.0), active - r, TIES.keys("w", "drop", mask.numel())
    )
    return new, kept, r


def test_zero_gradients_regrow_uniformly_over_output_channels() -> None:
    """A 64x64x3x3 conv whose gradients are all zero (dead units): every candidate ties, and the
    regrown positions spread over the output channels as a uniform draw would; the lowest-index
    rule put all of them in the first quarter of the channels."""
    weights, mask = _layer((64, 64, 3, 3), 0.3, seed=1)
    grads = torch.zeros_like(weights)
    new, kept, r = _regrown(weights, grads, mask, 0.5)
    grown = new & ~kept
    assert int(new.sum()) == int(mask.sum()) and int(grown.sum()) == r
    candidates = ~kept
    statistic, df = _chi_square(grown, candidates, groups=64)
    assert statistic < _chi_square_critical(df), statistic
    share = float(grown[:16].sum()) / r
    assert 0.2 < share < 0.3, share  # the first quarter of the output channels
    old = keep_top(torch.where(kept, -1.0, grads), r)  # the old rule: the lowest indices
    old_statistic, _ = _chi_square(old & candidates, candidates, groups=64)
    assert old_statistic > 100 * _chi_square_critical(df)
    assert float(old[:16].sum()) / r == 1.0


def test_bf16_gradients_tied_at_the_cut_regrow_uniformly_over_output_channels() -> None:
    """A 256x256x3x3 conv at 10% density whose gradients carry bf16's 8 significant bits: the
    positions chosen among those tied at the regrowth cut spread over the output channels
    (16 groups of 16) as a uniform draw among the tied would."""
    weights, mask = _layer((256, 256, 3, 3), 0.1, seed=2)
    g = torch.Generator().manual_seed(3)
    grads = (torch.randn(weights.shape, generator=g) * 1e-3).bfloat16().float()
    new, kept, r = _regrown(weights, grads, mask, 0.5)
    scores = torch.where(kept, -1.0, grads.abs())
    cut = scores[new & ~kept].min()  # the r-th largest score among the candidates
    tied = (scores == cut) & ~kept
    chosen = tied & new
    assert int(tied.sum()) > 2 * int(chosen.sum()) > 200  # a real draw among many tied
    statistic, df = _chi_square(chosen, tied, groups=16)
    assert statistic < _chi_square_critical(df), statistic
    old = keep_top(scores, r)
    old_statistic, _ = _chi_square(old & tied, tied, groups=16)
    assert old_statistic > 5 * _chi_square_critical(df)


# ---- two workers ---------------------------------------------------------------------------------


def _tied_model() -> nn.Module:
    """A conv layer and a linear layer, weights rounded to 1/8 (ties in every prune)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, bias=False), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p * 8).round() / 8)
    return model


def _tied_update(sync: DistributedSync | None) -> dict[str, torch.Tensor]:
    """One GraNet update (global prune and regrowth) with the conv's gradients rounded to bf16
    and the linear layer's all zero."""
    model = _tied_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = GraNetConfig(init_density=0.5, final_density=0.2, update_interval=1, prune_end=1)
    engine = GraNet(model, optimizer, config, total_steps=20, steps_per_epoch=10, sync=sync)
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        grad = (torch.randn(p.shape, generator=g) * 1e-2).bfloat16().float()
        p.grad = grad if name.startswith("0.") else torch.zeros_like(p)
    stats = engine.step()
    assert stats is not None and stats["grown"] > 0
    return {n: m.clone() for n, m in engine.masks.items()}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save({"masks": _tied_update(DistributedSync())}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_break_massive_ties_identically(tmp_path: Path) -> None:
    """The workers' exact mask check passes (it raises on any difference) and both hold the
    masks one process computes alone."""
    results: list[dict[str, Any]] = gloo_workers(_worker, 2, tmp_path)
    alone = _tied_update(None)
    for result in results:
        assert result["masks"].keys() == alone.keys()
        for n, m in alone.items():
            assert torch.equal(result["masks"][n], m), n


@pytest.mark.parametrize("seed", range(3))
def test_gathering_the_tied_on_the_cpu_picks_what_the_device_path_picks(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GATHER_TIES_ON_CPU`` (keys hashed at the tied positions only) and the device path
    (every key hashed, no sync) give the same masks: keep_top with keys and with a key
    source, the global prune over several layers, and a prune-and-regrow, on masses of ties
    (zero gradients, four distinct magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (16, 8, 3, 3), "b.weight": (40, 30), "c.weight": (10, 40)}
    weights = {n: torch.randint(0, 4, s, generator=g).float() for n, s in shapes.items()}
    masks = {n: torch.rand(s, generator=g) < 0.7 for n, s in shapes.items()}
    grads = {n: torch.zeros(s) for n, s in shapes.items()}
    flat = weights["b.weight"].reshape(-1)
    keys = TIES.keys("b.weight", "grow", flat.numel())
    source = TIES.source(["b.weight"], [flat.numel()], "grow", torch.device("cpu"))
    results = []
    for gather in (True, False):
        monkeypatch.setattr(criteria, "GATHER_TIES_ON_CPU", gather)
        tops = [keep_top(flat, k, keys) for k in range(0, flat.numel() + 1, 37)]
        tops += [keep_top(flat, k, source) for k in range(0, flat.numel() + 1, 37)]
        pruned = global_magnitude_prune(weights, masks, 0.3, TIES)
        regrown = prune_and_regrow(weights, grads, pruned, 0.4, TIES)
        results.append((tops, pruned, regrown))
    (tops_a, pruned_a, regrown_a), (tops_b, pruned_b, regrown_b) = results
    assert all(torch.equal(a, b) for a, b in zip(tops_a, tops_b, strict=True))
    for n in shapes:
        assert torch.equal(pruned_a[n], pruned_b[n]) and torch.equal(regrown_a[n], regrown_b[n])
