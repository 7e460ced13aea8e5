"""Invariants of the prune and regrow criteria (docs/algorithm.md section 3), checked against a
plain sort-based reference: exact counts, no revival, regrowth never shrinks a layer, ties to
the larger random key of the update's ``TieBreak`` (section 5), then to the lower index."""

from __future__ import annotations

import math

import pytest
import torch

from granet_ray.sparsity.criteria import (
    TieBreak,
    active_counts,
    global_magnitude_prune,
    keep_top,
    kth_largest,
    layerwise_magnitude_prune,
    prune_and_regrow,
    random_scores,
    regrow_count,
)

SHAPES = {"a.weight": (8, 3, 3, 3), "b.weight": (16, 8), "c.weight": (10, 16)}
TIES = TieBreak(seed=0, update=1)


def _random_layers(seed: int, density: float = 0.6, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    grads = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    masks = {n: torch.rand(s, generator=g) < density for n, s in shapes.items()}
    for n in shapes:
        weights[n] = weights[n] * masks[n]  # inactive weights are zero, as in training
    return weights, grads, masks


def _ref_top(
    scores: list[float], candidates: list[int], k: int, keys: list[int] | None = None
) -> set[int]:
    """The k candidates of largest score, ties to the larger key, then to the lower index."""
    keys = keys or [0] * len(scores)
    return set(sorted(candidates, key=lambda i: (-scores[i], -keys[i], i))[:k])


def _keys(name: str, purpose: str, numel: int) -> list[int]:
    return TIES.keys(name, purpose, numel).tolist()


def _count(masks) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in masks.items()}


# --- keep_top --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 5, 17, 39, 40, 41, 100])
def test_keep_top_exact_k(k: int) -> None:
    scores = torch.randn(5, 8, generator=torch.Generator().manual_seed(k))
    kept = keep_top(scores, k)
    assert kept.shape == scores.shape and kept.dtype == torch.bool
    assert int(kept.sum()) == min(k, 40)
    flat = scores.reshape(-1).tolist()
    assert set(torch.nonzero(kept.reshape(-1)).reshape(-1).tolist()) == _ref_top(
        flat, list(range(40)), k
    )


def test_keep_top_without_keys_ties_go_to_lower_index() -> None:
    assert keep_top(torch.zeros(6), 3).tolist() == [True, True, True, False, False, False]
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    assert keep_top(scores, 2).tolist() == [False, True, True, False, False, False]
    assert keep_top(scores, 5).tolist() == [True, True, True, True, False, True]
    many = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0])
    assert keep_top(many, 4).tolist() == [True, True, True, False, False, False, False, True]


def _tied_scores(seed: int, n: int) -> torch.Tensor:
    """n scores from only 5 distinct values, plus -1 (an inactive position's masked score)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (n,), generator=g).float() * 0.25
    scores[torch.rand(n, generator=g) < 0.2] = -1.0
    return scores


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [1, 2, 7, 64, 91])
def test_kth_largest_kthvalue_and_topk_agree_at_every_k(seed: int, n: int) -> None:
    """Both threshold methods (kthvalue: the CPU default; topk of the smaller side: the CUDA
    default) give the same k-th largest value, so masks are the same on every device."""
    scores = _tied_scores(seed, n)
    ordered = sorted(scores.tolist(), reverse=True)
    for k in range(1, n + 1):
        by_kthvalue = kth_largest(scores, k, method="kthvalue")
        by_topk = kth_largest(scores, k, method="topk")
        assert by_kthvalue.dim() == by_topk.dim() == 0
        assert by_kthvalue.item() == by_topk.item() == ordered[k - 1], k
    assert kth_largest(scores, 1).item() == ordered[0]  # the default method on this device


@pytest.mark.parametrize("seed", range(3))
def test_keep_top_same_masks_with_either_method(seed: int) -> None:
    scores = _tied_scores(seed, 6 * 15).view(6, 15)
    flat = scores.reshape(-1).tolist()
    for k in range(0, scores.numel() + 2):
        by_kthvalue = keep_top(scores, k, method="kthvalue")
        by_topk = keep_top(scores, k, method="topk")
        assert torch.equal(by_kthvalue, by_topk), k
        expected = _ref_top(flat, list(range(len(flat))), k)  # ties to the lower flat index
        assert set(torch.nonzero(by_topk.reshape(-1)).reshape(-1).tolist()) == expected, k


# --- global / layerwise magnitude pruning ----------------------------------------------------


@pytest.mark.parametrize(("density", "expected"), [(0.29, 29), (0.57, 57), (0.07, 7), (0.5, 50)])
def test_global_prune_keeps_floor_of_density_times_n(density: float, expected: int) -> None:
    """N = 100 where binary rounding bites: 0.29 * 100 == 28.999999999999996 in floats."""
    g = torch.Generator().manual_seed(0)
    weights = {
        "x.weight": torch.randn(4, 10, generator=g),
        "y.weight": torch.randn(6, 10, generator=g),
    }
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    out = global_magnitude_prune(weights, masks, density, TIES)
    assert sum(_count(out).values()) == expected


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("density", [0.05, 0.2, 0.33, 0.5])
def test_global_prune_matches_reference(seed: int, density: float) -> None:
    weights, _, masks = _random_layers(seed, density=0.7)
    out = global_magnitude_prune(weights, masks, density, TIES)
    names = sorted(masks)
    flat_w = torch.cat([weights[n].abs().reshape(-1) for n in names]).tolist()
    flat_m = torch.cat([masks[n].reshape(-1) for n in names]).tolist()
    total = len(flat_w)
    active = [i for i, m in enumerate(flat_m) if m]
    keep = math.floor(density * total + 1e-9)
    keys = [k for n in names for k in _keys(n, "prune", masks[n].numel())]
    expected = _ref_top(flat_w, active, keep, keys) if keep < len(active) else set(active)
    got_flat = torch.cat([out[n].reshape(-1) for n in names])
    assert set(torch.nonzero(got_flat).reshape(-1).tolist()) == expected
    assert sum(_count(out).values()) == min(keep, len(active))
    for n in names:
        assert out[n].shape == masks[n].shape and out[n].dtype == torch.bool


def test_global_prune_never_revives() -> None:
    """Inactive positions holding huge values stay inactive; only active weights compete."""
    g = torch.Generator().manual_seed(1)
    weights = {"x.weight": torch.randn(10, 10, generator=g)}
    masks = {"x.weight": torch.rand(10, 10, generator=g) < 0.5}
    weights["x.weight"][~masks["x.weight"]] = 1e6
    out = global_magnitude_prune(weights, masks, 0.2, TIES)
    assert not bool((out["x.weight"] & ~masks["x.weight"]).any())
    assert int(out["x.weight"].sum()) == 20
    # a target above the active count leaves the masks as they are (nothing is revived)
    same = global_magnitude_prune(weights, masks, 0.9, TIES)
    assert torch.equal(same["x.weight"], masks["x.weight"])


def test_global_prune_is_global_not_per_layer() -> None:
    """One layer of large weights keeps all of them; the small layer loses everything."""
    weights = {"big.weight": torch.full((5, 5), 10.0), "small.weight": torch.full((5, 5), 0.1)}
    weights["big.weight"][0, 0] = 9.0
    masks = {n: torch.ones(5, 5, dtype=torch.bool) for n in weights}
    out = global_magnitude_prune(weights, masks, 0.5, TIES)  # keep 25 of 50
    assert int(out["big.weight"].sum()) == 25
    assert int(out["small.weight"].sum()) == 0


def test_global_prune_does_not_modify_inputs() -> None:
    weights, _, masks = _random_layers(2)
    before = {n: m.clone() for n, m in masks.items()}
    global_magnitude_prune(weights, masks, 0.1, TIES)
    assert all(torch.equal(before[n], masks[n]) for n in masks)


@pytest.mark.parametrize("density", [0.29, 0.1, 0.5])
def test_layerwise_prune_per_layer(density: float) -> None:
    shapes = {"x.weight": (10, 10), "y.weight": (4, 25), "z.weight": (3, 3)}
    g = torch.Generator().manual_seed(3)
    weights = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    masks = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
    masks["z.weight"][0] = False  # 6 of 9 active
    out = layerwise_magnitude_prune(weights, masks, density, TIES)
    for n, s in shapes.items():
        numel = math.prod(s)
        keep = math.floor(density * numel + 1e-9)
        active = [i for i, m in enumerate(masks[n].reshape(-1).tolist()) if m]
        flat = weights[n].abs().reshape(-1).tolist()
        keys = _keys(n, "prune", numel)
        expected = _ref_top(flat, active, keep, keys) if keep < len(active) else set(active)
        assert set(torch.nonzero(out[n].reshape(-1)).reshape(-1).tolist()) == expected, n
    assert int(out["x.weight"].sum()) == math.floor(density * 100 + 1e-9)


# --- regrow_count / prune_and_regrow ---------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "active", "expected"),
    [
        (0.5, 7, 4),
        (0.5, 8, 4),
        (0.3, 10, 3),
        (0.07, 100, 7),  # 0.07 * 100 == 7.000000000000001 in floats
        (0.005, 1, 1),
        (0.005, 300, 2),
        (0.0, 10, 0),
        (1.0, 5, 5),
        (0.5, 0, 0),
    ],
)
def test_regrow_count_is_ceil(fraction: float, active: int, expected: int) -> None:
    assert regrow_count(fraction, active) == expected


def _check_prune_and_regrow(weights, grads, masks, fraction) -> dict[str, torch.Tensor]:
    out = prune_and_regrow(weights, grads, masks, fraction, TIES)
    known = prune_and_regrow(weights, grads, masks, fraction, TIES, active_counts(masks))
    assert all(torch.equal(known[n], m) for n, m in out.items())  # counts given or counted
    for n, mask in masks.items():
        new = out[n]
        assert new.dtype == torch.bool and new.shape == mask.shape
        flat_m = mask.reshape(-1).tolist()
        active = [i for i, m in enumerate(flat_m) if m]
        a = len(active)
        r = math.ceil(fraction * a - 1e-9)
        # exact count: the layer never shrinks nor grows
        assert int(new.sum()) == a, n
        drop, grow = (_keys(n, purpose, mask.numel()) for purpose in ("drop", "grow"))
        kept = _ref_top(weights[n].abs().reshape(-1).tolist(), active, a - r, drop)
        candidates = [i for i in range(mask.numel()) if i not in kept]
        grown = _ref_top(grads[n].abs().reshape(-1).tolist(), candidates, r, grow)
        assert set(torch.nonzero(new.reshape(-1)).reshape(-1).tolist()) == kept | grown, n
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fraction", [0.005, 0.1, 0.3, 0.5, 1.0])
def test_prune_and_regrow_matches_reference(seed: int, fraction: float) -> None:
    weights, grads, masks = _random_layers(seed)
    _check_prune_and_regrow(weights, grads, masks, fraction)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_prune_and_regrow_all_zero_grads_never_shrinks(fraction: float) -> None:
    """ReLU dead units: gradients exactly zero everywhere; ties stay among inactive positions."""
    weights, _, masks = _random_layers(7)
    grads = {n: torch.zeros_like(w) for n, w in weights.items()}
    out = _check_prune_and_regrow(weights, grads, masks, fraction)
    assert _count(out) == _count(masks)


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_prune_and_regrow_grads_only_on_active_positions(fraction: float) -> None:
    """The largest gradients sit on kept (active) positions: they must not be picked."""
    weights, grads, masks = _random_layers(8)
    grads = {n: torch.where(masks[n], grads[n].abs() + 100.0, 0.0) for n in masks}
    out = _check_prune_and_regrow(weights, grads, masks, fraction)
    assert _count(out) == _count(masks)


def test_prune_and_regrow_few_candidates() -> None:
    """A nearly dense layer (few inactive positions) and a fully dense one keep their counts."""
    g = torch.Generator().manual_seed(9)
    weights = {
        "x.weight": torch.randn(10, 10, generator=g),
        "d.weight": torch.randn(4, 4, generator=g),
    }
    grads = {n: torch.randn(w.shape, generator=g) for n, w in weights.items()}
    masks = {
        "x.weight": torch.ones(10, 10, dtype=torch.bool),
        "d.weight": torch.ones(4, 4, dtype=torch.bool),
    }
    masks["x.weight"].view(-1)[:3] = False  # 97 active, 3 inactive candidates
    weights["x.weight"][~masks["x.weight"]] = 0.0
    out = _check_prune_and_regrow(weights, grads, masks, 0.5)
    assert int(out["x.weight"].sum()) == 97
    # a dense layer can only regrow what it just removed: its mask is unchanged
    assert torch.equal(out["d.weight"], masks["d.weight"])
    out = _check_prune_and_regrow(
        weights, {n: torch.zeros_like(w) for n, w in grads.items()}, masks, 1.0
    )
    assert int(out["x.weight"].sum()) == 97


def test_prune_and_regrow_removes_smallest_and_grows_largest_grad() -> None:
    w = torch.tensor([[5.0, 0.1, 3.0, 0.0], [0.2, 0.0, 4.0, 0.0]])
    m = w != 0  # 5 active: 5.0, 0.1, 3.0, 0.2, 4.0
    g = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 9.0, 0.0, 2.0]])
    out = prune_and_regrow({"w": w}, {"w": g}, {"w": m}, 0.4, TIES)  # r = ceil(2.0) = 2
    # removed 0.1 and 0.2; grown at |g| = 9 and 2 (flat 5 and 7)
    expected = torch.tensor([[True, False, True, False], [False, True, True, True]])
    assert torch.equal(out["w"], expected)


def test_prune_and_regrow_can_regrow_a_just_removed_weight() -> None:
    w = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    m = w != 0
    g = torch.tensor([7.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # the removed weight has the largest grad
    out = prune_and_regrow({"w": w}, {"w": g}, {"w": m}, 0.5, TIES)  # r = 2: remove 1.0 and 2.0
    assert out["w"].tolist() == [True, False, True, True, False, False]


def test_prune_and_regrow_keeps_count_with_nonfinite_grads() -> None:
    """Section 3b: 'the layer's active count is unchanged'. Under CUDA AMP a mask update can
    fall on a step whose unscaled gradients hold inf / NaN (GradScaler then skips the optimizer
    step); the regrowth must still keep the count and never pick kept positions."""
    weights, grads, masks = _random_layers(10)
    bad = {n: g.clone() for n, g in grads.items()}
    for g in bad.values():
        g.view(-1)[::3] = float("nan")
        g.view(-1)[1::7] = float("inf")
    out = prune_and_regrow(weights, bad, masks, 0.5, TIES)
    assert _count(out) == _count(masks)


# --- random_scores (SET) ---------------------------------------------------------------------


def test_random_scores_deterministic_per_seed_update_name() -> None:
    masks = {n: torch.ones(s, dtype=torch.bool) for n, s in SHAPES.items()}
    a = random_scores(masks, seed=1, update=3)
    b = random_scores(masks, seed=1, update=3)
    c = random_scores(masks, seed=1, update=4)
    d = random_scores(masks, seed=2, update=3)
    alone = random_scores({"b.weight": masks["b.weight"]}, seed=1, update=3)
    for n in SHAPES:
        assert a[n].shape == masks[n].shape
        assert bool(((a[n] >= 0) & (a[n] < 1)).all())
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])
        assert not torch.equal(a[n], d[n])
    assert torch.equal(alone["b.weight"], a["b.weight"])  # independent of other layers
    twins = random_scores({"p.weight": masks["b.weight"], "q.weight": masks["b.weight"]}, 1, 3)
    assert not torch.equal(twins["p.weight"], twins["q.weight"])


def test_prune_and_regrow_with_random_scores_keeps_counts() -> None:
    weights, _, masks = _random_layers(11)
    scores = random_scores(masks, seed=0, update=1)
    out = _check_prune_and_regrow(weights, scores, masks, 0.3)
    assert _count(out) == _count(masks)
