"""Invariants of ERK / uniform allocation and exact-count seeded initial masks
(docs/algorithm.md section 1)."""

from __future__ import annotations

import math

import pytest
import torch

from granet_ray.sparsity.allocation import (
    active_count,
    erk_densities,
    initial_masks,
    uniform_densities,
)

SHAPE_SETS = {
    "small_cnn": {
        "conv1.weight": (16, 3, 3, 3),
        "conv2.weight": (32, 16, 3, 3),
        "conv3.weight": (64, 32, 3, 3),
        "fc.weight": (10, 64),
    },
    "mlp": {"l1.weight": (300, 784), "l2.weight": (100, 300), "l3.weight": (10, 100)},
    "tiny_conv_huge_linear": {"conv.weight": (3, 3, 3, 3), "fc.weight": (1000, 1000)},
    "resnetish": {
        "conv1.weight": (16, 3, 3, 3),
        "b1.weight": (16, 16, 3, 3),
        "b2.weight": (32, 16, 3, 3),
        "b3.weight": (64, 32, 3, 3),
        "down.weight": (64, 32, 1, 1),
        "fc.weight": (10, 64),
    },
}
TARGETS = [0.02, 0.05, 0.1, 0.2, 0.5, 0.8, 0.95]


def _numel(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    return {n: math.prod(s) for n, s in shapes.items()}


def _is_rounded(count: int, exact: float) -> bool:
    """count is round(exact); either neighbour is accepted at an exact .5 tie."""
    return abs(count - exact) <= 0.5 + 1e-9


def _raw(shape: tuple[int, ...]) -> float:
    return sum(shape) / math.prod(shape)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("which", sorted(SHAPE_SETS))
def test_erk_weighted_sum_is_target_and_densities_valid(which: str, target: float) -> None:
    shapes = SHAPE_SETS[which]
    numel = _numel(shapes)
    dens = erk_densities(shapes, target)
    assert set(dens) == set(shapes)
    assert all(0.0 < d <= 1.0 for d in dens.values())
    total = sum(numel.values())
    weighted = sum(dens[n] * numel[n] for n in shapes)
    assert weighted == pytest.approx(target * total, rel=1e-9)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("which", sorted(SHAPE_SETS))
def test_erk_is_the_fixed_point_of_the_dense_layer_iteration(which: str, target: float) -> None:
    """Non-dense layers share one eps = d_l / raw_l; every dense layer has eps * raw_l >= 1."""
    shapes = SHAPE_SETS[which]
    dens = erk_densities(shapes, target)
    sparse = [n for n in shapes if dens[n] < 1.0]
    dense = [n for n in shapes if dens[n] == 1.0]
    assert sparse, "some layer must stay sparse at these targets"
    eps = {n: dens[n] / _raw(shapes[n]) for n in sparse}
    first = next(iter(eps.values()))
    assert all(v == pytest.approx(first, rel=1e-9) for v in eps.values())
    assert all(first * _raw(shapes[n]) >= 1.0 - 1e-12 for n in dense)


def test_erk_tiny_first_conv_becomes_dense() -> None:
    shapes = SHAPE_SETS["tiny_conv_huge_linear"]
    dens = erk_densities(shapes, 0.5)
    assert dens["conv.weight"] == 1.0
    total = 81 + 1_000_000
    assert dens["fc.weight"] == pytest.approx((0.5 * total - 81) / 1_000_000, rel=1e-12)


def test_erk_dense_layer_iteration_needs_a_second_round() -> None:
    """After the first layer is made dense and eps is solved again, a second layer exceeds 1
    (a one-pass solution would give it a density > 1)."""
    shapes = {"a.weight": (8, 4), "b.weight": (16, 8), "c.weight": (32, 16, 3, 3)}
    numel = _numel(shapes)
    total = sum(numel.values())
    raw = {n: _raw(s) for n, s in shapes.items()}
    eps1 = 0.1 * total / sum(raw[n] * numel[n] for n in shapes)
    assert eps1 * raw["a.weight"] > 1.0 >= eps1 * raw["b.weight"]  # only a is over at first
    dens = erk_densities(shapes, 0.1)
    assert dens["a.weight"] == 1.0
    assert dens["b.weight"] == 1.0
    expected_c = (0.1 * total - numel["a.weight"] - numel["b.weight"]) / numel["c.weight"]
    assert dens["c.weight"] == pytest.approx(expected_c, rel=1e-12)


@pytest.mark.parametrize("target", [0.05, 0.2, 0.5])
def test_erk_gives_small_layers_higher_density(target: float) -> None:
    shapes = SHAPE_SETS["resnetish"]
    dens = erk_densities(shapes, target)
    names = sorted(shapes, key=lambda n: _raw(shapes[n]))
    ordered = [dens[n] for n in names]
    assert all(a <= b for a, b in zip(ordered, ordered[1:], strict=False))
    assert dens["conv1.weight"] > dens["b3.weight"]


def test_erk_raw_score_uses_the_whole_conv_shape() -> None:
    shapes = {"conv.weight": (64, 32, 3, 3), "fc.weight": (100, 300)}
    dens = erk_densities(shapes, 0.1)
    ratio = (64 + 32 + 3 + 3) / (64 * 32 * 9) / ((100 + 300) / (100 * 300))
    assert dens["conv.weight"] / dens["fc.weight"] == pytest.approx(ratio, rel=1e-12)


def test_erk_full_density_is_dense() -> None:
    dens = erk_densities(SHAPE_SETS["small_cnn"], 1.0)
    assert all(d == pytest.approx(1.0, abs=1e-12) and d <= 1.0 for d in dens.values())


def test_uniform_densities() -> None:
    shapes = SHAPE_SETS["small_cnn"]
    assert uniform_densities(shapes, 0.3) == dict.fromkeys(shapes, 0.3)


@pytest.mark.parametrize(
    ("density", "numel", "expected"),
    [(0.5, 10, 5), (0.33, 10, 3), (0.37, 10, 4), (0.29, 100, 29), (1.0, 7, 7), (0.001, 10, 0)],
)
def test_active_count_is_round(density: float, numel: int, expected: int) -> None:
    assert active_count(density, numel) == expected


@pytest.mark.parametrize("which", sorted(SHAPE_SETS))
@pytest.mark.parametrize("target", [0.05, 0.3, 0.77])
def test_initial_masks_exact_counts(which: str, target: float) -> None:
    shapes = SHAPE_SETS[which]
    dens = erk_densities(shapes, target)
    masks = initial_masks(shapes, dens, seed=3)
    assert set(masks) == set(shapes)
    for n, shape in shapes.items():
        m = masks[n]
        assert m.dtype == torch.bool
        assert tuple(m.shape) == shape
        assert _is_rounded(int(m.sum()), dens[n] * math.prod(shape))


def test_initial_masks_uniform_exact_counts() -> None:
    shapes = {"a.weight": (7, 11), "b.weight": (13, 5, 3, 3), "c.weight": (3, 4)}
    for d in (0.1, 0.25, 0.5, 0.9, 1.0):
        masks = initial_masks(shapes, uniform_densities(shapes, d), seed=0)
        for n, s in shapes.items():
            assert _is_rounded(int(masks[n].sum()), d * math.prod(s)), (n, d)


def test_initial_masks_deterministic_and_seed_dependent() -> None:
    shapes = SHAPE_SETS["small_cnn"]
    dens = uniform_densities(shapes, 0.3)
    a = initial_masks(shapes, dens, seed=11)
    b = initial_masks(shapes, dens, seed=11)
    c = initial_masks(shapes, dens, seed=12)
    for n in shapes:
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])


def test_initial_masks_independent_of_other_layers() -> None:
    """The same (name, seed) gives the same mask whatever other layers are present."""
    alone = {"conv2.weight": (32, 16, 3, 3)}
    full = SHAPE_SETS["small_cnn"]
    m_alone = initial_masks(alone, {"conv2.weight": 0.2}, seed=5)
    m_full = initial_masks(full, dict.fromkeys(full, 0.2), seed=5)
    assert torch.equal(m_alone["conv2.weight"], m_full["conv2.weight"])
    # and different names draw different positions
    twins = {"x.weight": (40, 40), "y.weight": (40, 40)}
    m = initial_masks(twins, dict.fromkeys(twins, 0.5), seed=5)
    assert not torch.equal(m["x.weight"], m["y.weight"])


def test_initial_masks_are_spread_over_the_layer() -> None:
    """Positions are chosen at random, not a prefix of the flat index."""
    shapes = {"fc.weight": (100, 100)}
    m = initial_masks(shapes, {"fc.weight": 0.5}, seed=0)["fc.weight"].reshape(-1)
    assert 2000 < int(m[:5000].sum()) < 3000
