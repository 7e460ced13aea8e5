"""Schedules over global optimizer steps: the cubic target density and the cosine regrowth
fraction (GraNet's p_t and the RigL paper's drop fraction are the same curve).

``step`` is the 1-based optimizer step t; ``prune_start`` / ``prune_end`` are t0 / tf in steps.
"""

from __future__ import annotations

import math


def target_density(
    step: int,
    *,
    update_interval: int,
    prune_start: int,
    prune_end: int,
    init_density: float,
    final_density: float,
) -> float | None:
    """Cubic gradual-pruning target D_k at a pruning update (docs/algorithm.md
    section 3a), else None.

    With k = step // dT, k0 = prune_start // dT, kf = prune_end // dT, a prune happens only at
    ``step % dT == 0`` and k0 < k <= kf, where
    D_k = d_f + (d_i - d_f) * (1 - (k - k0) / (kf - k0)) ** 3, so D_kf == d_f exactly.
    """
    if step <= 0 or step % update_interval:
        return None
    k = step // update_interval
    k0 = prune_start // update_interval
    kf = prune_end // update_interval
    if not k0 < k <= kf:
        return None
    progress = (k - k0) / (kf - k0)
    return final_density + (init_density - final_density) * (1.0 - progress) ** 3


def regrow_fraction(step: int, period: int, initial: float = 0.5, minimum: float = 0.005) -> float:
    """Cosine-annealed fraction ``minimum + (initial - minimum)(1 + cos(pi t / period)) / 2``.

    GraNet (docs/algorithm.md section 3b): p_t with p0 = 0.5, p_min = 0.005 over the whole run
    (period T). The RigL paper (section 4): f(t) = (alpha / 2)(1 + cos(pi t / T_end)), i.e.
    initial = alpha = 0.3, minimum = 0 and period = T_end, so it reaches 0 at T_end.
    """
    return minimum + (initial - minimum) * (1.0 + math.cos(math.pi * step / period)) / 2.0


def pruning_updates(*, update_interval: int, prune_start: int, prune_end: int) -> int:
    """Number of pruning updates in the window: kf - k0 (0 means the window holds no prune)."""
    return max(0, prune_end // update_interval - prune_start // update_interval)
