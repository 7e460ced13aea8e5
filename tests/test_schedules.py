"""Invariants of the cubic pruning schedule and the cosine regrowth fraction
(docs/algorithm.md section 3)."""

from __future__ import annotations

import math

import pytest

from granet_ray.sparsity.schedules import pruning_updates, regrow_fraction, target_density


def _target(step: int, dt: int = 10, t0: int = 0, tf: int = 50, di: float = 1.0, df: float = 0.1):
    return target_density(
        step,
        update_interval=dt,
        prune_start=t0,
        prune_end=tf,
        init_density=di,
        final_density=df,
    )


# --- target_density --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        # k0 = 0, kf = 5: D_k = 0.1 + 0.9 * (1 - k / 5) ** 3
        (10, 0.1 + 0.9 * 0.8**3),  # 0.5608
        (20, 0.1 + 0.9 * 0.6**3),  # 0.2944
        (30, 0.1 + 0.9 * 0.4**3),  # 0.1576
        (40, 0.1 + 0.9 * 0.2**3),  # 0.1072
    ],
)
def test_target_density_by_hand(step: int, expected: float) -> None:
    assert _target(step) == pytest.approx(expected, rel=1e-12)


def test_target_density_literal_numbers() -> None:
    assert _target(10) == pytest.approx(0.5608, rel=1e-12)
    assert _target(20) == pytest.approx(0.2944, rel=1e-12)
    # sparse-to-sparse: d_i = 0.5, d_f = 0.02, k0 = 1, kf = 5 (t0 = 10, tf = 50)
    got = _target(30, t0=10, di=0.5, df=0.02)
    assert got == pytest.approx(0.02 + 0.48 * (1 - 2 / 4) ** 3, rel=1e-12)


@pytest.mark.parametrize(
    ("di", "df"), [(1.0, 0.1), (1.0, 0.05), (1.0, 0.02), (0.5, 0.2), (0.5, 0.1), (0.7, 0.3)]
)
@pytest.mark.parametrize(("dt", "t0", "tf"), [(10, 0, 50), (7, 3, 100), (1000, 0, 80_000)])
def test_last_prune_is_exactly_final_density(
    di: float, df: float, dt: int, t0: int, tf: int
) -> None:
    kf = tf // dt
    assert _target(kf * dt, dt=dt, t0=t0, tf=tf, di=di, df=df) == df  # exact, not approx


@pytest.mark.parametrize(("dt", "t0", "tf"), [(10, 0, 50), (7, 3, 100), (5, 20, 41), (1, 0, 9)])
def test_target_density_monotone_and_bounded(dt: int, t0: int, tf: int) -> None:
    di, df = 0.8, 0.05
    values = [v for t in range(0, tf + 3 * dt) if (v := _target(t, dt, t0, tf, di, df)) is not None]
    assert len(values) == pruning_updates(update_interval=dt, prune_start=t0, prune_end=tf)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert all(df <= v < di for v in values)  # the first prune already removes something
    assert values[-1] == df


def test_target_density_none_off_update_and_outside_window() -> None:
    # t0 = 20, tf = 50, dT = 10: prunes only at t = 30, 40, 50
    hits = {t: _target(t, t0=20) for t in range(-10, 80)}
    assert {t for t, v in hits.items() if v is not None} == {30, 40, 50}
    assert _target(0) is None
    assert _target(20, t0=20) is None  # k == k0 is not a prune
    assert _target(60) is None  # k > kf
    assert _target(15) is None  # not a multiple of dT


def test_target_density_unaligned_window() -> None:
    # t0 = 15 -> k0 = 1; tf = 47 -> kf = 4: prunes at 20, 30, 40, last at 40 == d_f
    hits = {t: _target(t, t0=15, tf=47) for t in range(0, 100)}
    assert {t for t, v in hits.items() if v is not None} == {20, 30, 40}
    assert hits[40] == 0.1
    assert hits[20] == pytest.approx(0.1 + 0.9 * (1 - 1 / 3) ** 3, rel=1e-12)


def test_pruning_updates_counts() -> None:
    assert pruning_updates(update_interval=10, prune_start=0, prune_end=50) == 5
    assert pruning_updates(update_interval=10, prune_start=15, prune_end=47) == 3
    assert pruning_updates(update_interval=10, prune_start=0, prune_end=9) == 0
    assert pruning_updates(update_interval=100, prune_start=30, prune_end=90) == 0


# --- regrow_fraction -------------------------------------------------------------------------


def test_regrow_fraction_endpoints() -> None:
    assert regrow_fraction(0, 1000, 0.5, 0.005) == 0.5
    assert regrow_fraction(1000, 1000, 0.5, 0.005) == 0.005
    assert regrow_fraction(500, 1000, 0.5, 0.005) == pytest.approx((0.5 + 0.005) / 2, rel=1e-12)
    # defaults are the paper's p0 = 0.5, p_min = 0.005
    assert regrow_fraction(0, 10) == 0.5
    assert regrow_fraction(10, 10) == 0.005


@pytest.mark.parametrize(("p0", "pmin"), [(0.5, 0.005), (0.3, 0.0), (1.0, 0.1)])
def test_regrow_fraction_by_hand_in_range_and_decreasing(p0: float, pmin: float) -> None:
    total = 97
    values = [regrow_fraction(t, total, p0, pmin) for t in range(total + 1)]
    for t, v in enumerate(values):
        expected = pmin + (p0 - pmin) * (1 + math.cos(math.pi * t / total)) / 2
        assert v == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert pmin <= v <= p0
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    quarter = regrow_fraction(total / 4, total, p0, pmin)
    assert quarter == pytest.approx(pmin + (p0 - pmin) * (1 + math.sqrt(0.5)) / 2, rel=1e-12)


@pytest.mark.parametrize("end", [750, 46, 7])
def test_regrow_fraction_is_the_rigl_drop_fraction_over_t_end(end: int) -> None:
    """The RigL paper's f(t) = (alpha / 2)(1 + cos(pi t / T_end)), alpha = 0.3: initial = alpha,
    minimum = 0, period = T_end; it reaches exactly 0 at T_end."""
    assert regrow_fraction(0, end, 0.3, 0.0) == 0.3
    assert regrow_fraction(end, end, 0.3, 0.0) == 0.0
    for t in range(end + 1):
        expected = 0.15 * (1 + math.cos(math.pi * t / end))
        assert regrow_fraction(t, end, 0.3, 0.0) == pytest.approx(expected, rel=1e-12, abs=1e-15)
