"""Invariants of the GraNet engine (docs/algorithm.md, sections 1-6) on a tiny conv + linear
model.

Every step of every run is checked against docs/algorithm.md: inactive weights and
weight-shaped optimizer state are exactly 0, and at every mask update the new masks equal those
of a plain sort-based reference built from its formulas (cubic D_k, cosine p_t or the RigL drop
fraction, floor / ceil counts, ties to the larger random key of the update's ``TieBreak``, then
to the lower flat index in name order). A weight pruned by
(a) is gone before (b): if (b) regrows it, it starts at 0 with 0 optimizer state, like any
newly grown weight; a weight removed and regrown within (b) keeps its value. An update due at
a step with non-finite gradients runs at the next finite step with the due step's schedule.
"""

from __future__ import annotations

import copy
import io
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from granet_ray.config import ConfigError, GraNetConfig
from granet_ray.sparsity import (
    GraNet,
    LocalSync,
    TieBreak,
    erk_densities,
    neutral_state_keys,
    random_scores,
)

DT = 5  # update interval
SPE = 10  # steps per epoch
TOTAL = 62  # not a multiple of DT: no update falls on the very last step
LAYERS = {
    "0.weight": (8, 3, 3, 3),
    "2.weight": (8, 8, 3, 3),
    "5.weight": (32, 72),
    "7.weight": (4, 32),
}
N = sum(math.prod(s) for s in LAYERS.values())  # 3224
POISON = ("5.weight", "nan")
Tensors = dict[str, torch.Tensor]  # where and what a non-finite gradient step injects


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(72, 32),
        nn.ReLU(),
        nn.Linear(32, 4),
    )


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    params = model.parameters()
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.01)
    if kind == "adamw_amsgrad":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01, amsgrad=True)
    if kind == "rmsprop_centered":
        return torch.optim.RMSprop(params, lr=0.01, momentum=0.9, centered=True)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=0.05)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def cfg(method: str = "granet", **kw: Any) -> GraNetConfig:
    base: dict[str, Any] = {
        "method": method,
        "init_density": 1.0,
        "final_density": 0.1,
        "update_interval": DT,
        "prune_start": 0,
        "prune_end": 4,  # tf = 40 steps: prunes at 5, 10, ..., 40
        "seed": 0,
    }
    base.update(kw)
    return GraNetConfig(**base)


# --- an independent reference of one mask update, from docs/algorithm.md ----------------------


def _top(scores: list[float], candidates: list[int], k: int, keys: list[int]) -> set[int]:
    return set(sorted(candidates, key=lambda i: (-scores[i], -keys[i], i))[:k])


def _keys(ties: TieBreak, name: str, purpose: str, numel: int) -> list[int]:
    return ties.keys(name, purpose, numel).tolist()


def _flat_set(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask.reshape(-1)).reshape(-1).tolist())


def _from_set(positions: set[int], shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(math.prod(shape), dtype=torch.bool)
    out[sorted(positions)] = True
    return out.view(shape)


def ref_prune(
    weights: Tensors, masks: Tensors, density: float, global_: bool, ties: TieBreak
) -> Tensors:
    names = sorted(masks)
    if not global_:
        out = {}
        for n in names:
            keep = math.floor(density * masks[n].numel() + 1e-9)
            active = sorted(_flat_set(masks[n]))
            keys = _keys(ties, n, "prune", masks[n].numel())
            kept = _top(weights[n].abs().reshape(-1).tolist(), active, keep, keys)
            out[n] = _from_set(kept if keep < len(active) else set(active), masks[n].shape)
        return out
    flat_w = torch.cat([weights[n].abs().reshape(-1) for n in names]).tolist()
    flat_m = torch.cat([masks[n].reshape(-1) for n in names])
    active = torch.nonzero(flat_m).reshape(-1).tolist()
    keep = math.floor(density * len(flat_w) + 1e-9)
    keys = [k for n in names for k in _keys(ties, n, "prune", masks[n].numel())]
    kept = _top(flat_w, active, keep, keys) if keep < len(active) else set(active)
    out, start = {}, 0
    for n in names:
        size = masks[n].numel()
        local = {i - start for i in kept if start <= i < start + size}
        out[n] = _from_set(local, masks[n].shape)
        start += size
    return out


def ref_regrow(
    weights: Tensors, scores: Tensors, masks: Tensors, fraction: float, ties: TieBreak
) -> tuple[Tensors, Tensors]:
    """(new masks, kept masks): per layer remove the r = ceil(fraction * a) active weights of
    smallest |w| (kept = the rest), regrow the r non-kept positions of largest |score|; ties
    by the ``drop`` and ``grow`` keys of ``ties``."""
    out, kept_masks = {}, {}
    for n, mask in masks.items():
        active = sorted(_flat_set(mask))
        r = math.ceil(fraction * len(active) - 1e-9)
        drop = _keys(ties, n, "drop", mask.numel())
        kept = _top(weights[n].abs().reshape(-1).tolist(), active, len(active) - r, drop)
        candidates = [i for i in range(mask.numel()) if i not in kept]
        grow = _keys(ties, n, "grow", mask.numel())
        grown = _top(scores[n].abs().reshape(-1).tolist(), candidates, r, grow)
        out[n] = _from_set(kept | grown, mask.shape)
        kept_masks[n] = _from_set(kept, mask.shape)
    return out, kept_masks


def hand_target(c: GraNetConfig, t: int) -> float | None:
    """D_k at a pruning update (section 3a; gmp starts dense, rigl / set / static never prune)."""
    if c.method not in ("granet", "granet_uniform", "gmp") or t % c.update_interval:
        return None
    di = 1.0 if c.method == "gmp" else c.init_density
    k, k0 = t // c.update_interval, round(c.prune_start * SPE) // c.update_interval
    kf = round(c.prune_end * SPE) // c.update_interval
    if not k0 < k <= kf:
        return None
    return c.final_density + (di - c.final_density) * (1 - (k - k0) / (kf - k0)) ** 3


def hand_global(c: GraNetConfig) -> bool:
    """Pruning ranks all layers together: the default but for granet_uniform (section 4)."""
    return (c.prune_scope or ("layer" if c.method == "granet_uniform" else "global")) == "global"


def hand_fraction(c: GraNetConfig, t: int, total: int) -> float | None:
    """The regrowth fraction at an update (sections 3b, 4), None where there is no regrowth.

    GraNet: p_min + (p0 - p_min)(1 + cos(pi t / T)) / 2 with p0 = 0.5, p_min = 0.005, until
    T (or regrow_end). RigL / SET (the RigL paper): (alpha / 2)(1 + cos(pi t / T_end)) with
    alpha = 0.3, T_end = 0.75 T (the step floor(0.75 T)) or regrow_end, 0 from T_end on.
    Every value overridable; the cosine of RigL / SET then reaches p_min at T_end."""
    if c.method not in ("granet", "granet_uniform", "rigl", "set") or t % c.update_interval:
        return None
    rigl = c.method in ("rigl", "set")
    if c.regrow_end is not None:
        end = round(c.regrow_end * SPE)
    else:
        end = math.floor(0.75 * total) if rigl else total
    if t < round(c.prune_start * SPE) or t > end:
        return None
    p0 = c.regrow_fraction if c.regrow_fraction is not None else (0.3 if rigl else 0.5)
    pmin = c.regrow_min if c.regrow_min is not None else (0.0 if rigl else 0.005)
    period = end if rigl else total
    fraction = pmin + (p0 - pmin) * (1 + math.cos(math.pi * t / period)) / 2
    return fraction if fraction > 0 else None


def hand_due(c: GraNetConfig, t: int, total: int) -> bool:
    return hand_target(c, t) is not None or hand_fraction(c, t, total) is not None


# --- the harness ---------------------------------------------------------------------------


def _weight_states(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v) and v.shape == p.shape
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN equal to NaN."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


class Run:
    """One training run whose every engine step is checked against the reference. It keeps
    the reference's own schedule state: the due step of a postponed update and the updates
    it superseded (section 2; a superseded prune target still counts, the lowest one wins)."""

    def __init__(
        self,
        config: GraNetConfig,
        *,
        opt: str = "sgd",
        model_seed: int = 0,
        total: int = TOTAL,
        model: nn.Module | None = None,
    ) -> None:
        self.cfg = config
        self.total = total
        self.model = model if model is not None else tiny_model(model_seed)
        self.opt = make_optimizer(self.model, opt)
        self.engine = GraNet(self.model, self.opt, config, total_steps=total, steps_per_epoch=SPE)
        self.params = dict(self.model.named_parameters())
        self.after_prune: dict[int, dict[str, int]] = {}
        self.pending: int | None = None
        self.superseded: list[int] = []
        self.last: dict[str, dict[str, torch.Tensor]] = {}  # masks of the latest update

    def forward_backward(self, t: int, bad: tuple[str, str] | None = None) -> None:
        """One training step; ``bad = (parameter, "nan" | "inf")`` fills that gradient with
        the non-finite value and skips the optimizer step, as GradScaler does."""
        x, y = batch(t)
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if bad is None:
            self.opt.step()
        else:
            self.params[bad[0]].grad.fill_(float(bad[1]))

    def _schedule(self, t: int, finite: bool) -> int | None:
        """The reference schedule state after step ``t``: the due step of the update that
        runs at ``t``, if any."""
        if hand_due(self.cfg, t, self.total):
            if self.pending is not None:
                self.superseded.append(self.pending)
            self.pending = t
        if self.pending is None or not finite:
            return None
        due, self.pending = self.pending, None
        return due

    def _reads_gradients(self, t: int) -> bool:
        if self.cfg.method not in ("granet", "granet_uniform", "rigl"):
            return False
        steps = [t] if self.pending is None else [t, self.pending]
        return any(hand_fraction(self.cfg, s, self.total) is not None for s in steps)

    def step(
        self, t: int, check: bool = True, bad: tuple[str, str] | None = None
    ) -> dict[str, Any] | None:
        self.forward_backward(t, bad)
        eng = self.engine
        if not check:
            self._schedule(t, bad is None)
            return eng.step()
        assert eng.reads_gradients(t) == self._reads_gradients(t), t
        old = {n: m.clone() for n, m in eng.masks.items()}
        w = {n: self.params[n].detach().clone() * old[n] for n in old}
        st = {
            n: {k: v.clone() * old[n] for k, v in _weight_states(self.opt, self.params[n]).items()}
            for n in old
        }
        g = {n: self.params[n].grad.clone() for n in self.params}
        stats = eng.step()
        due = self._schedule(t, bad is None)
        superseded = list(self.superseded)
        assert eng.step_count == t
        assert eng.pending == self.pending, t
        for n in self.params:  # gradients are never masked: regrowth reads them dense
            assert _same(self.params[n].grad, g[n]), n
        new = eng.masks
        after = kept = expected = old
        if due is None:
            assert stats is None, t
        else:
            assert stats is not None and stats is eng.history[-1], t
            targets = [x for s in (*superseded, due) if (x := hand_target(self.cfg, s)) is not None]
            target = min(targets, default=None)
            fraction = hand_fraction(self.cfg, due, self.total)
            if target is not None:
                ties = TieBreak(self.cfg.seed, due // self.cfg.update_interval)
                after = ref_prune(w, old, target, hand_global(self.cfg), ties)
                if hand_global(self.cfg):  # floor(D_k * N) over all prunable layers
                    kept_total = sum(int(m.sum()) for m in after.values())
                    active = sum(int(m.sum()) for m in old.values())
                    assert kept_total == min(math.floor(target * N + 1e-9), active)
                else:  # floor(D_k * n_l) per layer
                    for n, m in after.items():
                        keep = math.floor(target * m.numel() + 1e-9)
                        assert int(m.sum()) == min(keep, int(old[n].sum()))
            self.after_prune[t] = {n: int(m.sum()) for n, m in after.items()}
            kept = expected = after
            if fraction is not None:
                if self.cfg.method == "set":
                    scores = random_scores(after, self.cfg.seed, due // self.cfg.update_interval)
                else:
                    scores = g
                ties = TieBreak(self.cfg.seed, due // self.cfg.update_interval)
                expected, kept = ref_regrow(w, scores, after, fraction, ties)
                for n in after:  # regrowth keeps every layer's count exactly
                    assert int(expected[n].sum()) == int(after[n].sum())
            self._check_stats(
                stats, t, due, superseded, target, fraction, old, after, kept, expected
            )
            self.superseded = []
            self.last = {"old": old, "after": after, "kept": kept, "new": expected}
        assert set(new) == set(old)
        for n in old:
            assert torch.equal(new[n], expected[n]), (t, n)
        self._check_values(after, w, st)
        assert eng.next_update_step() == self._next_update(t), t
        return stats

    def _next_update(self, t: int) -> int | None:
        if self.pending is not None:
            return t + 1
        return next(
            (s for s in range(t + 1, self.total + 1) if hand_due(self.cfg, s, self.total)), None
        )

    def _check_stats(
        self,
        stats: dict[str, Any],
        t: int,
        due: int,
        superseded: list[int],
        target: float | None,
        fraction: float | None,
        old: Tensors,
        after: Tensors,
        kept: Tensors,
        new: Tensors,
    ) -> None:
        assert stats["step"] == t and stats["due_step"] == due
        assert stats["update"] == due // self.cfg.update_interval
        assert stats.get("superseded", []) == superseded
        if target is None:
            assert stats["target_density"] is None
        else:
            assert stats["target_density"] == pytest.approx(target, rel=1e-12)
        if fraction is None:
            assert stats["regrow_fraction"] is None
        else:
            assert stats["regrow_fraction"] == pytest.approx(fraction, rel=1e-12)
        assert stats["density"] == sum(int(m.sum()) for m in new.values()) / N
        for n in old:
            layer = stats["layers"][n]
            assert layer["density"] == int(new[n].sum()) / new[n].numel()
            assert layer["pruned"] == int((old[n] & ~after[n]).sum()), n  # by (a)
            assert layer["removed"] == int((after[n] & ~kept[n]).sum()), n  # r_l, by (b)
            assert layer["regrown"] == int((new[n] & ~kept[n]).sum()) == layer["removed"], n
            assert layer["grown"] == int((new[n] & ~after[n]).sum()), n  # inactive before (b)
            assert layer["rekept"] == int((new[n] & after[n] & ~kept[n]).sum()), n
        for key in ("pruned", "removed", "regrown", "grown", "rekept"):
            assert stats[key] == sum(v[key] for v in stats["layers"].values()), key

    def _check_values(self, after: Tensors, w: Tensors, st: dict[str, Tensors]) -> None:
        """Inactive weights and state exactly 0; the weights active after (a) that stay active
        keep value and state (removed and regrown by (b) included); the rest start at 0."""
        for n, mask in self.engine.masks.items():
            p = self.params[n].detach()
            states = _weight_states(self.opt, self.params[n])
            assert bool((p[~mask] == 0).all()), n  # inactive weights exactly 0
            assert torch.equal(p[mask & after[n]], w[n][mask & after[n]]), n  # kept keep value
            assert bool((p[mask & ~after[n]] == 0).all()), n  # newly grown start at 0
            for k, v in states.items():
                assert bool((v[~mask] == 0).all()), (n, k)
                assert bool((v[mask & ~after[n]] == 0).all()), (n, k)
                assert torch.equal(v[mask & after[n]], st[n][k][mask & after[n]]), (n, k)

    def run(
        self,
        start: int = 1,
        stop: int | None = None,
        check: bool = True,
        bad_steps: Iterable[int] = (),
        bad: tuple[str, str] = POISON,
    ) -> Run:
        """Steps ``start..stop``; those in ``bad_steps`` have non-finite gradients ``bad``."""
        bad_steps = set(bad_steps)
        for t in range(start, (stop or self.total) + 1):
            self.step(t, check, bad if t in bad_steps else None)
        return self

    def counts(self) -> dict[str, int]:
        return {n: int(m.sum()) for n, m in self.engine.masks.items()}


def _update_steps(history: list[dict[str, Any]]) -> list[int]:
    return [h["step"] for h in history]


# --- methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_granet_dense_to_sparse_every_step(opt: str) -> None:
    r = Run(cfg(), opt=opt)
    assert r.counts() == {n: math.prod(s) for n, s in LAYERS.items()}  # d_i = 1: dense
    r.run()
    hist = r.engine.history
    assert _update_steps(hist) == list(range(5, TOTAL + 1, DT))
    # the last prune (t = 40) lands exactly on floor(d_f * N), and regrowth keeps it there
    last = next(h for h in hist if h["step"] == 40)
    assert last["target_density"] == 0.1
    assert sum(r.after_prune[40].values()) == math.floor(0.1 * N) == 322
    assert r.engine.density() == 322 / N
    assert all(h["regrown"] > 0 for h in hist)  # regrowth really happened
    assert any(h["grown"] > 0 and h["rekept"] > 0 for h in hist)  # both kinds of regrowth
    assert all(h["target_density"] is None for h in hist if h["step"] > 40)
    assert r.engine.step_count == TOTAL


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_granet_sparse_to_sparse_erk_init(opt: str) -> None:
    c = cfg(init_density=0.5, final_density=0.2)
    r = Run(c, opt=opt)
    dens = erk_densities(LAYERS, 0.5)
    for n, s in LAYERS.items():
        numel = math.prod(s)
        assert abs(r.counts()[n] - dens[n] * numel) <= 0.5  # round(d_l * n_l)
        assert bool((r.params[n].detach()[~r.engine.masks[n]] == 0).all())  # weights masked
    assert r.counts()["0.weight"] > 0.5 * 216  # ERK: the small first conv is denser
    r.run()
    assert r.engine.density() == math.floor(0.2 * N) / N


def test_granet_uniform_prunes_per_layer() -> None:
    c = cfg("granet_uniform", init_density=0.5, final_density=0.2, allocation="erk")
    r = Run(c)
    for n, s in LAYERS.items():  # granet_uniform always allocates uniformly
        assert abs(r.counts()[n] - 0.5 * math.prod(s)) <= 0.5
    r.run()
    for n, s in LAYERS.items():
        assert r.after_prune[40][n] == math.floor(0.2 * math.prod(s) + 1e-9)


def test_gmp_starts_dense_never_regrows() -> None:
    c = cfg("gmp", init_density=0.5, final_density=0.1)  # gmp ignores init_density
    r = Run(c)
    assert r.engine.density() == 1.0
    masks = [dict(r.engine.masks)]
    for t in range(1, TOTAL + 1):
        r.step(t)
        masks.append(dict(r.engine.masks))
    for before, after in zip(masks, masks[1:], strict=False):
        for n in before:
            assert not bool((after[n] & ~before[n]).any())  # pruning never revives
    hist = r.engine.history
    assert _update_steps(hist) == list(range(5, 41, DT))
    assert all(h["regrown"] == 0 and h["regrow_fraction"] is None for h in hist)
    assert r.engine.density() == math.floor(0.1 * N) / N


def test_gmp_prunes_per_layer_on_request() -> None:
    r = Run(cfg("gmp", prune_scope="layer")).run()  # the reference prunes each layer alone
    assert _update_steps(r.engine.history) == list(range(5, 41, DT))
    for n, s in LAYERS.items():
        assert r.counts()[n] == math.floor(0.1 * math.prod(s) + 1e-9)


def test_rigl_starts_at_final_density_and_stops_regrowth_at_three_quarters() -> None:
    c = cfg("rigl", final_density=0.2, init_density=1.0)
    r = Run(c)
    dens = erk_densities(LAYERS, 0.2)
    initial = r.counts()
    for n, s in LAYERS.items():
        assert abs(initial[n] - dens[n] * math.prod(s)) <= 0.5
    r.run()
    assert r.counts() == initial  # no pruning: every layer keeps its count throughout
    hist = r.engine.history
    assert _update_steps(hist) == [t for t in range(5, TOTAL + 1, DT) if t <= 0.75 * TOTAL]
    assert all(h["target_density"] is None and h["pruned"] == 0 for h in hist)
    # the RigL paper's drop fraction (alpha / 2)(1 + cos(pi t / T_end)), T_end = 46
    assert hist[0]["regrow_fraction"] == pytest.approx(0.15 * (1 + math.cos(math.pi * 5 / 46)))
    assert all(h["regrown"] > 0 for h in hist)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_rigl_and_set_schedule_values_are_overridable(method: str) -> None:
    """alpha, the floor of the cosine and T_end (3 epochs = step 30) all given: the cosine
    reaches p_min = 0.05 at T_end, which still regrows; nothing after it."""
    c = cfg(method, final_density=0.3, regrow_fraction=0.5, regrow_min=0.05, regrow_end=3)
    r = Run(c).run()
    hist = r.engine.history
    assert _update_steps(hist) == list(range(5, 31, DT))
    assert hist[-1]["regrow_fraction"] == pytest.approx(0.05, rel=1e-12)
    assert hist[0]["regrow_fraction"] == pytest.approx(
        0.05 + 0.45 * (1 + math.cos(math.pi * 5 / 30)) / 2, rel=1e-12
    )


def test_set_grows_randomly_and_keeps_counts() -> None:
    r = Run(cfg("set", final_density=0.2))
    initial = r.counts()
    r.run()  # the reference checks growth == top-r of the (seed, update, name) random scores
    assert r.counts() == initial
    assert all(h["regrown"] > 0 for h in r.engine.history)


def test_static_never_changes() -> None:
    r = Run(cfg("static", final_density=0.2))
    initial = {n: m.clone() for n, m in r.engine.masks.items()}
    r.run()
    assert r.engine.history == []
    assert r.engine.next_update_step() is None
    assert all(torch.equal(initial[n], m) for n, m in r.engine.masks.items())


def test_regrow_end_and_prune_start() -> None:
    c = cfg(prune_start=1, prune_end=4, regrow_end=5)  # t0 = 10, regrow until t = 50
    r = Run(c).run()
    hist = r.engine.history
    assert _update_steps(hist) == list(range(10, 51, DT))
    assert [h["step"] for h in hist if h["target_density"] is not None] == list(range(15, 41, 5))
    assert hist[0]["target_density"] is None  # k == k0: regrowth only
    # GraNet's cosine still runs over the whole run, not up to regrow_end
    assert hist[-1]["regrow_fraction"] == pytest.approx(
        0.005 + 0.495 * (1 + math.cos(math.pi * 50 / TOTAL)) / 2, rel=1e-12
    )


@pytest.mark.parametrize(("first", "last"), [(True, False), (False, True), (True, True)])
def test_dense_first_and_dense_last(first: bool, last: bool) -> None:
    c = cfg(dense_first=first, dense_last=last)
    model = tiny_model()
    opt = make_optimizer(model, "sgd")
    engine = GraNet(model, opt, c, total_steps=TOTAL, steps_per_epoch=SPE)
    expected = set(LAYERS) - ({"0.weight"} if first else set()) - ({"7.weight"} if last else set())
    assert set(engine.masks) == expected
    for t in range(1, TOTAL + 1):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        engine.step()
    n_prunable = sum(math.prod(LAYERS[n]) for n in expected)
    assert engine.density() == math.floor(0.1 * n_prunable) / n_prunable
    if first:
        assert bool((model[0].weight != 0).all())
    if last:
        assert bool((model[7].weight != 0).all())
    summary = {row["name"]: row for row in engine.summary()["layers"]}
    assert summary["0.weight"]["prunable"] is not first
    assert summary["7.weight"]["prunable"] is not last


def test_dense_first_last_chosen_by_module_type_not_name() -> None:
    model = nn.Sequential(
        OrderedDict(
            fc=nn.Conv2d(3, 4, 3),  # the first conv, although named like a linear layer
            conv=nn.Conv2d(4, 4, 3),
            flat=nn.Flatten(),
            last=nn.Linear(16, 8),
            conv_out=nn.Linear(8, 2),  # the last linear, although named like a conv
        )
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GraNet(
        model, opt, cfg(dense_first=True, dense_last=True), total_steps=50, steps_per_epoch=10
    )
    assert set(engine.masks) == {"conv.weight", "last.weight"}
    # biases and normalization parameters are never prunable
    plain = GraNet(model, opt, cfg(), total_steps=50, steps_per_epoch=10)
    assert set(plain.masks) == {"fc.weight", "conv.weight", "last.weight", "conv_out.weight"}


def test_granet_sparse_init_with_uniform_allocation() -> None:
    r = Run(cfg(init_density=0.5, final_density=0.2, allocation="uniform"))
    for n, s in LAYERS.items():
        assert abs(r.counts()[n] - 0.5 * math.prod(s)) <= 0.5
    r.run(stop=20)


# --- targeted update checks ------------------------------------------------------------------


def _one_layer_engine(opt_kind: str) -> tuple[nn.Parameter, torch.optim.Optimizer, GraNet]:
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    opt = make_optimizer(model, opt_kind)
    c = cfg("rigl", final_density=0.5, update_interval=10, regrow_fraction=0.5)
    engine = GraNet(model, opt, c, total_steps=1000, steps_per_epoch=10)
    for _ in range(9):
        assert engine.step() is None
    return model[0].weight, opt, engine


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_removed_and_regrown_weight_keeps_value_new_weights_start_at_zero(opt_kind: str) -> None:
    p, opt, engine = _one_layer_engine(opt_kind)
    mask = engine.masks["0.weight"].reshape(-1).clone()
    active = torch.nonzero(mask).reshape(-1).tolist()
    inactive = torch.nonzero(~mask).reshape(-1).tolist()
    assert len(active) == 8
    with torch.no_grad():
        flat = p.view(-1)
        for rank, i in enumerate(active):  # |w| = 1..8; active[0] is the smallest
            flat[i] = -(rank + 1.0) if rank % 2 else rank + 1.0
        grad = torch.zeros(16)
        grad[active[0]] = 100.0  # the weakest weight has the strongest gradient
        for rank, i in enumerate(inactive):
            grad[i] = 10.0 - rank
    p.grad = grad.view(4, 4)
    if opt_kind == "sgd":
        opt.state[p] = {"momentum_buffer": torch.arange(1.0, 17.0).view(4, 4) * mask.view(4, 4)}
    else:
        opt.state[p] = {
            "step": torch.tensor(3.0),
            "exp_avg": torch.arange(1.0, 17.0).view(4, 4) * mask.view(4, 4),
            "exp_avg_sq": torch.arange(2.0, 18.0).view(4, 4) * mask.view(4, 4),
        }
    before_w = p.detach().clone().view(-1)
    before_state = {k: v.clone().view(-1) for k, v in opt.state[p].items() if v.dim() == 2}
    stats = engine.step()
    assert stats is not None and stats["step"] == 10
    new = engine.masks["0.weight"].reshape(-1)
    # r = ceil(f_10 * 8) = 4 (alpha = 0.5 given): remove |w| = 1..4, regrow active[0] and the
    # 3 best inactive positions
    assert int(new.sum()) == 8
    grown = set(inactive[:3])
    assert set(torch.nonzero(new).reshape(-1).tolist()) == set(active[4:]) | {active[0]} | grown
    w = p.detach().view(-1)
    assert w[active[0]] == before_w[active[0]] == 1.0  # removed and regrown: never gone
    for i in grown:
        assert w[i] == 0.0
    for i in active[1:4]:  # removed for good
        assert w[i] == 0.0
    for k, v in before_state.items():
        now = opt.state[p][k].view(-1)
        assert now[active[0]] == v[active[0]] != 0
        assert all(now[i] == 0 for i in grown | set(active[1:4]))
    layer = stats["layers"]["0.weight"]
    assert (layer["removed"], layer["regrown"], layer["grown"], layer["rekept"]) == (4, 4, 3, 1)


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_weight_pruned_by_a_and_regrown_by_b_starts_at_zero(opt_kind: str) -> None:
    """docs/algorithm.md section 3a: a weight pruned by the gradual prune is gone before
    regrowth, so if regrowth picks it in the same update it comes back at 0 with 0 optimizer
    state (it used to come back with its old value and momentum); one removed and regrown by
    (b) keeps both."""
    model = nn.Linear(10, 10, bias=False)  # a bare layer: its weight is named "weight"
    opt = make_optimizer(model, opt_kind)
    c = cfg(final_density=0.5, update_interval=10, prune_end=1)  # prune at t = 10 to D = 0.5
    engine = GraNet(model, opt, c, total_steps=1000, steps_per_epoch=10)
    assert set(engine.masks) == {"weight"}
    for _ in range(9):
        assert engine.step() is None
    signs = torch.where(torch.arange(100) % 3 == 0, -1.0, 1.0)
    with torch.no_grad():
        model.weight.copy_((signs * (torch.arange(100) + 1.0) / 100).view(10, 10))  # |w| rises
    grad = torch.arange(100.0) / 1000  # small everywhere ...
    grad[:20] = 100.0 + torch.arange(20.0)  # ... but large on 20 weights (a) prunes
    grad[60:65] = 50.0  # and on 5 weights (b) removes
    grad[75:] = 1000.0  # the largest on kept weights: never candidates
    model.weight.grad = grad.view(10, 10)
    moments = {"momentum_buffer": 1.0} if opt_kind == "sgd" else {"exp_avg": 1.0, "exp_avg_sq": 2.0}
    opt.state[model.weight] = {k: torch.full((10, 10), v) for k, v in moments.items()}
    if opt_kind == "adam":
        opt.state[model.weight]["step"] = torch.tensor(9.0)
    before = model.weight.detach().clone().view(-1)
    stats = engine.step()
    # (a) keeps the 50 largest |w| (flat 50..99); p_10 = 0.49988: (b) removes r = ceil(24.99)
    # = 25 (flat 50..74) and regrows the 25 best-gradient non-kept positions: 0..19 and 60..64
    assert stats is not None and stats["target_density"] == 0.5
    expected = set(range(20)) | set(range(60, 65)) | set(range(75, 100))
    assert _flat_set(engine.masks["weight"]) == expected
    w = model.weight.detach().view(-1)
    pruned_then_regrown, rekept = list(range(20)), list(range(60, 65)) + list(range(75, 100))
    assert bool((w[pruned_then_regrown] == 0).all())
    assert torch.equal(w[rekept], before[rekept])
    for key, value in moments.items():
        state = opt.state[model.weight][key].view(-1)
        assert bool((state[pruned_then_regrown] == 0).all()), key
        assert bool((state[rekept] == value).all()), key
        assert int(state.count_nonzero()) == 30, key
    assert int(w.count_nonzero()) == 30  # the 20 grown at 0: only the 30 kept are non-zero
    assert {k: stats[k] for k in ("pruned", "removed", "regrown", "grown", "rekept")} == {
        "pruned": 50,
        "removed": 25,
        "regrown": 25,
        "grown": 20,
        "rekept": 5,
    }
    assert stats["layers"]["weight"]["grown"] == 20


class _FakeSync:
    """Replaces the local gradients by a fixed pattern, as an all-reduce would replace them by
    the workers' mean, and records the mask checks."""

    world_size = 2

    def __init__(self) -> None:
        self.averaged: list[set[str]] = []
        self.checked: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.flags: list[bool] = []

    def average(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.averaged.append(set(tensors))
        out = dict(tensors)
        for key, value in tensors.items():
            if key.startswith("g/"):
                out[key] = torch.arange(value.numel(), dtype=torch.float32).view(value.shape)
        return out

    def all(self, flag: bool) -> bool:
        self.flags.append(flag)
        return flag

    def check(self, masks: dict[str, torch.Tensor], step: int) -> None:
        self.checked.append((step, {n: m.clone() for n, m in masks.items()}))


def test_decisions_use_the_averaged_scores_and_every_update_is_checked() -> None:
    """docs/algorithm.md section 5: the update decides on the all-reduced scores; masks are
    verified after."""
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = _FakeSync()
    c = cfg("rigl", final_density=0.5, update_interval=3)
    engine = GraNet(model, opt, c, total_steps=100, steps_per_epoch=10, sync=sync)
    before = {n: m.clone() for n, m in engine.masks.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.rand(p.shape)  # local gradients that must be ignored
    for _ in range(3):
        engine.step()
    assert sync.flags == [True]  # the workers agreed the gradients are finite, at step 3 only
    assert sync.averaged == [{"w/0.weight", "w/1.weight", "g/0.weight", "g/1.weight"}]
    assert [s for s, _ in sync.checked] == [3]
    averaged = {
        n: torch.arange(m.numel(), dtype=torch.float32).view(m.shape) for n, m in before.items()
    }
    ties = TieBreak(c.seed, 1)  # the update at step 3 = 1 x update_interval
    expected, _ = ref_regrow(weights, averaged, before, hand_fraction(c, 3, 100), ties)
    for n, m in engine.masks.items():
        assert torch.equal(m, expected[n]), n
        assert torch.equal(sync.checked[0][1][n], m)


def test_dead_relu_layers_never_shrink() -> None:
    """A dead ReLU makes every weight gradient exactly zero: regrowth still keeps the counts."""
    model = tiny_model()
    with torch.no_grad():
        model[5].bias.fill_(-1e4)  # every unit after the first linear layer is dead
    r = Run(cfg(), model=model)
    r.forward_backward(0)
    assert all(bool((r.params[n].grad == 0).all()) for n in LAYERS)
    r.opt.zero_grad()
    r.run()  # the reference checks every update
    for t, after in r.after_prune.items():
        stats = next(h for h in r.engine.history if h["step"] == t)
        for n, count in after.items():
            assert stats["layers"][n]["density"] == count / math.prod(LAYERS[n])
    assert r.engine.density() == math.floor(0.1 * N) / N


def test_missing_gradient_counts_as_zero() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GraNet(model, opt, cfg("rigl", final_density=0.5), total_steps=100, steps_per_epoch=10)
    before = {n: int(m.sum()) for n, m in engine.masks.items()}
    for _ in range(DT):
        engine.step()  # no backward at all: every .grad is None
    assert engine.history and {n: int(m.sum()) for n, m in engine.masks.items()} == before


# --- non-finite gradients (docs/algorithm.md section 2) ---------------------------------------


@pytest.mark.parametrize(
    ("due", "bad"),  # a prune + regrow update, a regrow-only one; a whole layer or a bias
    [
        (10, ("5.weight", "nan")),
        (45, ("5.weight", "inf")),
        (10, ("7.bias", "inf")),
        (45, ("7.bias", "nan")),
    ],
)
def test_nonfinite_gradients_postpone_the_update(due: int, bad: tuple[str, str]) -> None:
    """The GradScaler skipped the optimizer step at the due step: no mask changes; the update
    runs at the next finite step with the due step's D_k and p_t (the reference checks it)."""
    r = Run(cfg()).run(stop=due - 1)
    masks = {n: m.clone() for n, m in r.engine.masks.items()}
    assert r.step(due, bad=bad) is None
    assert all(torch.equal(masks[n], m) for n, m in r.engine.masks.items())
    assert r.engine.pending == due and r.engine.next_update_step() == due + 1
    stats = r.step(due + 1)
    assert (stats["step"], stats["due_step"], stats["update"]) == (due + 1, due, due // DT)
    target = hand_target(r.cfg, due)
    assert stats["target_density"] == (None if target is None else pytest.approx(target, rel=1e-12))
    assert stats["regrow_fraction"] == pytest.approx(hand_fraction(r.cfg, due, TOTAL), rel=1e-12)
    assert "superseded" not in stats and r.engine.pending is None
    # NaN / inf scores are never ranked: growth is not the lowest flat non-kept indices (where
    # ranking non-finite gradients as 0 would put it)
    kept, new = r.last["kept"]["5.weight"].reshape(-1), r.last["new"]["5.weight"].reshape(-1)
    grown = torch.nonzero(new & ~kept).reshape(-1)
    lowest = torch.nonzero(~kept).reshape(-1)[: grown.numel()]
    assert grown.numel() > 0 and not torch.equal(grown, lowest)
    r.run(start=due + 2)
    assert [h["step"] for h in r.engine.history].count(due) == 0
    assert r.engine.density() == math.floor(0.1 * N) / N


def test_postponed_update_still_pending_at_the_next_due_step_is_superseded() -> None:
    r = Run(cfg()).run(bad_steps=range(10, 16))  # non-finite from the update at 10 to 15
    hist = {h["due_step"]: h for h in r.engine.history}
    assert 10 not in hist
    assert hist[15]["step"] == 16 and hist[15]["superseded"] == [10]
    assert sum("superseded" in h for h in r.engine.history) == 1
    assert r.engine.density() == math.floor(0.1 * N) / N


def test_superseded_last_prune_still_lands_on_final_density() -> None:
    """The last prune (t = 40) is superseded by the regrow-only update at 45: the update that
    runs (at 46) prunes to d_f anyway, so the run still ends exactly on floor(d_f * N)."""
    r = Run(cfg()).run(bad_steps=range(40, 46))
    stats = next(h for h in r.engine.history if h["due_step"] == 45)
    assert stats["step"] == 46 and stats["superseded"] == [40]
    assert stats["target_density"] == 0.1
    assert stats["regrow_fraction"] == pytest.approx(hand_fraction(r.cfg, 45, TOTAL), rel=1e-12)
    assert r.engine.density() == math.floor(0.1 * N) / N


# --- optimizer state (docs/algorithm.md section 2) --------------------------------------------


class _MomentumSGD(torch.optim.SGD):
    """A subclass of a supported optimizer: masked like its base."""


class _Custom(torch.optim.Optimizer):
    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        super().__init__(params, {"lr": 0.1})


def _params() -> list[nn.Parameter]:
    return list(tiny_model().parameters())


@pytest.mark.parametrize(
    ("optimizer", "keys"),
    [
        (torch.optim.SGD, ("momentum_buffer",)),
        (_MomentumSGD, ("momentum_buffer",)),
        (torch.optim.Adam, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
        (torch.optim.AdamW, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
        (torch.optim.RMSprop, ("square_avg", "momentum_buffer", "grad_avg")),
        (torch.optim.Adagrad, ("sum",)),
    ],
)
def test_neutral_state_keys_of_supported_optimizers(
    optimizer: type[torch.optim.Optimizer], keys: tuple[str, ...]
) -> None:
    assert neutral_state_keys(optimizer(_params(), lr=0.01)) == keys


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda ps: torch.optim.Rprop(ps), ("optimizer=Rprop", "step_size")),
        (lambda ps: torch.optim.LBFGS(ps), ("optimizer=LBFGS", "old_dirs")),
        (
            lambda ps: torch.optim.Adagrad(ps, initial_accumulator_value=0.1),
            ("optimizer=Adagrad", "'sum'", "initial_accumulator_value=0.1"),
        ),
        (_Custom, ("optimizer=_Custom", "not known")),
    ],
)
def test_optimizers_with_state_not_neutral_at_zero_are_refused(
    make: Callable[..., torch.optim.Optimizer], words: tuple[str, ...]
) -> None:
    model = tiny_model()
    with pytest.raises(ConfigError) as err:
        GraNet(model, make(model.parameters()), cfg(), total_steps=TOTAL, steps_per_epoch=SPE)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("opt", ["adamw_amsgrad", "rmsprop_centered", "adagrad"])
def test_other_supported_optimizers_keep_inactive_state_at_zero(opt: str) -> None:
    """The reference checks every weight-shaped state tensor at every step: 0 where inactive,
    0 where newly grown, unchanged where kept."""
    r = Run(cfg(init_density=0.5), opt=opt).run()
    p = r.params["5.weight"]
    names = {
        "adamw_amsgrad": {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
        "rmsprop_centered": {"square_avg", "momentum_buffer", "grad_avg"},
        "adagrad": {"sum"},
    }[opt]
    assert set(_weight_states(r.opt, p)) == names
    assert r.engine.density() == math.floor(0.1 * N) / N


# --- names that survive wrappers -------------------------------------------------------------


def _short_run(model: nn.Module, forward: nn.Module, c: GraNetConfig, steps: int = 10) -> GraNet:
    opt = make_optimizer(model, "sgd")
    engine = GraNet(forward, opt, c, total_steps=TOTAL, steps_per_epoch=SPE)
    engine.measure_flops(batch(0)[0])  # eagerly, before a compiled model's first call
    for t in range(1, steps + 1):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        opt.step()
        engine.step()
    return engine


def test_compiled_and_ddp_models_get_the_plain_names_and_masks(tmp_path: Path) -> None:
    """torch.compile (the eager backend: the same wrapper, no compiler needed) and DDP (one
    gloo process) name the prunable weights as the plain model does, so masks drawn from
    (seed, layer name) and every decision after them are the same; the FLOPs measured by one
    eager forward before the first compiled call are the plain model's."""
    c = cfg(init_density=0.5)
    plain = tiny_model()
    reference = _short_run(plain, plain, c)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        wrappers = {
            "compile": lambda m: torch.compile(m, backend="eager"),
            "ddp": nn.parallel.DistributedDataParallel,
            "compile(ddp)": lambda m: torch.compile(
                nn.parallel.DistributedDataParallel(m), backend="eager"
            ),
        }
        for kind, wrap in wrappers.items():
            model = tiny_model()
            engine = _short_run(model, wrap(model), c)
            assert list(engine.masks) == list(LAYERS), kind
            for n, m in reference.masks.items():
                assert torch.equal(engine.masks[n], m), (kind, n)
            assert engine.history == reference.history, kind
            assert engine.inference_flops() == reference.inference_flops(), kind
    finally:
        dist.destroy_process_group()


def test_the_flops_hooks_split_no_compiled_graph() -> None:
    """The FLOPs recorder's hooks do nothing while Dynamo traces (removing themselves there
    would split the graph for good): a compiled forward and backward before any eager one
    is one graph, without a graph break, and records no FLOPs; ``measure_flops`` then does."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model()
    opt = make_optimizer(model, "sgd")
    compiled = torch.compile(model, backend="eager")
    engine = GraNet(compiled, opt, cfg(init_density=0.5), total_steps=TOTAL, steps_per_epoch=SPE)
    x, y = batch(1)
    F.cross_entropy(compiled(x), y).backward()
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert engine.inference_flops() is None
    engine.measure_flops(x)
    plain = tiny_model()
    eager = GraNet(
        plain,
        make_optimizer(plain, "sgd"),
        cfg(init_density=0.5),
        total_steps=TOTAL,
        steps_per_epoch=SPE,
    )
    plain(x)
    assert engine.inference_flops() == eager.inference_flops() is not None
    F.cross_entropy(compiled(x), y).backward()
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert model.training


def test_bare_layer_models_name_their_weight_weight() -> None:
    for model in (
        nn.Linear(6, 4),
        nn.Conv2d(3, 4, 3),
        torch.compile(nn.Linear(6, 4), backend="eager"),
    ):
        engine = GraNet(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            cfg(init_density=0.5),
            total_steps=TOTAL,
            steps_per_epoch=SPE,
        )
        assert list(engine.masks) == ["weight"]
        assert engine.density() == 0.5


# --- masking at memory speed -----------------------------------------------------------------


def _count_foreach_mul(
    monkeypatch: pytest.MonkeyPatch,
) -> list[list[tuple[torch.dtype, torch.dtype, bool]]]:
    """Every ``torch._foreach_mul_`` call's (target dtype, factor dtype, same strides)."""
    calls: list[list[tuple[torch.dtype, torch.dtype, bool]]] = []
    real = torch._foreach_mul_

    def counting(targets: list[torch.Tensor], factors: list[torch.Tensor]) -> None:
        calls.append(
            [
                (t.dtype, f.dtype, t.stride() == f.stride())
                for t, f in zip(targets, factors, strict=True)
            ]
        )
        return real(targets, factors)

    monkeypatch.setattr(torch, "_foreach_mul_", counting)
    return calls


def test_masking_is_skipped_while_dense_then_one_fused_call_per_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_foreach_mul(monkeypatch)
    r = Run(cfg())  # dense to sparse: all-ones masks until the first prune at t = 5
    r.run(stop=4)
    assert calls == []
    r.step(5)
    assert len(calls) == 2  # after (a), and after the update
    for t in range(6, 10):
        r.step(t)
        assert len(calls) == 2 + t - 5  # one fused pass per step: 4 weights + 4 momenta
        assert calls[-1] == [(torch.float32, torch.float32, True)] * 8


class _ToDouble(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def test_masking_runs_one_pass_per_dtype_with_multipliers_in_that_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = nn.Sequential(nn.Linear(6, 6), _ToDouble(), nn.Linear(6, 2).double())
    opt = make_optimizer(model, "sgd")
    engine = GraNet(model, opt, cfg("static", final_density=0.5), total_steps=9, steps_per_epoch=3)
    calls = _count_foreach_mul(monkeypatch)
    x, y = torch.randn(4, 6), torch.randint(0, 2, (4,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    engine.step()
    assert len(calls) == 2  # one fused pass per dtype: [weight, momentum] each
    assert {tuple(c) for c in calls} == {
        ((torch.float32, torch.float32, True),) * 2,
        ((torch.float64, torch.float64, True),) * 2,
    }
    for n, p in engine.params.items():
        assert bool((p[~engine.masks[n]] == 0).all())
        assert bool((opt.state[p]["momentum_buffer"][~engine.masks[n]] == 0).all())


def test_channels_last_masks_keep_the_weight_memory_format(monkeypatch: pytest.MonkeyPatch) -> None:
    c = cfg(init_density=0.5)
    base = tiny_model()
    last = copy.deepcopy(base).to(memory_format=torch.channels_last)
    a = Run(c, model=base)
    b = Run(c, model=last)
    for n in ("0.weight", "2.weight"):
        assert b.params[n].is_contiguous(memory_format=torch.channels_last)
        assert b.engine.masks[n].is_contiguous(memory_format=torch.channels_last), n
    for n in LAYERS:  # the initial masking is exact in either format
        assert torch.equal(a.params[n], b.params[n]), n
    calls = _count_foreach_mul(monkeypatch)
    for t in range(1, 31):
        a.step(t)
        b.step(t)  # the reference checks the channels-last run too
        for n in LAYERS:
            assert torch.equal(a.engine.masks[n], b.engine.masks[n]), (t, n)
    for n in ("0.weight", "2.weight"):
        assert b.params[n].is_contiguous(memory_format=torch.channels_last)
        assert b.engine.masks[n].is_contiguous(memory_format=torch.channels_last), n
        # the conv kernels of the two formats round differently; the masking itself is exact
        torch.testing.assert_close(a.params[n], b.params[n], rtol=0, atol=1e-5)
    assert a.engine.history == b.engine.history
    # every multiplier has its target's strides: no layout conversion in the masking pass
    assert calls and all(same for call in calls for _, _, same in call)


_HOST_SYNCS = (
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "numpy",
    "cpu",
    "count_nonzero",
    "nonzero",
)


def test_step_makes_no_host_sync_between_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between mask updates ``engine.step()`` neither reads a value nor counts on the host:
    every tensor-to-host conversion raises there (update steps may sync)."""

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("host sync in engine.step() between updates")

    r = Run(cfg(init_density=1.0))  # a dense phase, then sparse
    quiet = 0
    for t in range(1, TOTAL + 1):
        r.forward_backward(t, POISON if t == 30 else None)  # one postponed update too
        if r.engine.next_update_step() == t:
            r.engine.step()
            continue
        with monkeypatch.context() as patch:
            for name in _HOST_SYNCS:
                patch.setattr(torch.Tensor, name, forbidden)
            patch.setattr(torch, "count_nonzero", forbidden)
            patch.setattr(torch, "nonzero", forbidden)
            assert r.engine.step() is None
        quiet += 1
    assert quiet == TOTAL - len(r.engine.history) - 1  # all but the update attempts
    assert r.engine.history[5]["due_step"] == 30 and r.engine.history[5]["step"] == 31


# --- determinism and resume ------------------------------------------------------------------


def test_same_seed_same_data_identical_masks_and_weights() -> None:
    a = Run(cfg(init_density=0.5, final_density=0.1)).run(check=False)
    b = Run(cfg(init_density=0.5, final_density=0.1)).run(check=False)
    assert all(torch.equal(a.engine.masks[n], b.engine.masks[n]) for n in LAYERS)
    assert all(torch.equal(a.params[n], b.params[n]) for n in a.params)
    assert a.engine.history == b.engine.history
    c = Run(cfg(init_density=0.5, final_density=0.1, seed=1)).run(stop=1, check=False)
    assert any(not torch.equal(a.engine.masks[n], c.engine.masks[n]) for n in LAYERS)


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize(
    ("method", "opt", "init", "bad_steps"),
    [
        ("granet", "sgd", 0.5, ()),
        ("granet", "adam", 1.0, ()),
        ("set", "sgd", 1.0, ()),
        ("granet", "sgd", 1.0, (30,)),  # saved with the update due at 30 pending
        ("granet", "adam", 0.5, range(25, 31)),  # ... and with the one due at 25 superseded
    ],
)
def test_resume_from_state_dicts_equals_uninterrupted_run(
    method: str, opt: str, init: float, bad_steps: Iterable[int]
) -> None:
    c = cfg(method, init_density=init, final_density=0.1)
    a = Run(c, opt=opt).run(check=False, bad_steps=bad_steps)
    half = 30
    b = Run(c, opt=opt).run(stop=half, check=False, bad_steps=bad_steps)
    saved = _roundtrip(
        {
            "model": b.model.state_dict(),
            "optimizer": b.opt.state_dict(),
            "engine": b.engine.state_dict(),
        }
    )
    assert saved["engine"]["pending"] == (30 if bad_steps else None)
    fresh = Run(c, opt=opt, model_seed=123)  # different init: everything must come from state
    fresh.model.load_state_dict(saved["model"])
    fresh.opt.load_state_dict(saved["optimizer"])
    fresh.engine.load_state_dict(saved["engine"])
    fresh.pending, fresh.superseded = b.pending, list(b.superseded)  # the reference's too
    assert fresh.engine.step_count == half and fresh.engine.pending == b.engine.pending
    fresh.run(start=half + 1)  # fully checked continuation
    assert fresh.engine.step_count == a.engine.step_count == TOTAL
    assert all(torch.equal(a.engine.masks[n], fresh.engine.masks[n]) for n in LAYERS)
    for n, p in a.model.state_dict().items():
        assert torch.equal(p, fresh.model.state_dict()[n]), n
    assert a.engine.history == fresh.engine.history
    assert a.engine.training_flops() == fresh.engine.training_flops()
    assert a.engine.state_dict()["density_steps"] == fresh.engine.state_dict()["density_steps"]


def test_state_dict_is_a_snapshot() -> None:
    r = Run(cfg()).run(stop=12, check=False)
    state = copy.deepcopy(r.engine.state_dict())
    snap = r.engine.state_dict()
    r.run(start=13, stop=30, check=False)
    assert all(torch.equal(snap["masks"][n], state["masks"][n]) for n in LAYERS)
    assert snap["step"] == 12 and len(snap["history"]) == len(state["history"])


def test_load_state_dict_rejects_other_layers() -> None:
    r = Run(cfg())
    state = r.engine.state_dict()
    state["masks"] = {"0.weight": state["masks"]["0.weight"]}
    with pytest.raises(ValueError, match="prunable layers"):
        r.engine.load_state_dict(state)


def test_local_sync_is_a_single_worker() -> None:
    sync = LocalSync()
    tensors = {"a": torch.ones(2)}
    assert sync.world_size == 1 and sync.average(tensors) is tensors
    assert sync.all(True) is True and sync.all(False) is False
    assert sync.check({"a": torch.ones(2, dtype=torch.bool)}, 5) is None


# --- configuration errors --------------------------------------------------------------------


def test_prune_window_without_an_update_raises() -> None:
    model = tiny_model()
    opt = make_optimizer(model, "sgd")
    c = cfg(update_interval=50, prune_start=0, prune_end=4)  # tf = 40 < dT: no prune at all
    with pytest.raises(ConfigError, match="update_interval"):
        GraNet(model, opt, c, total_steps=TOTAL, steps_per_epoch=SPE)
    c = cfg(update_interval=20, prune_start=4.5, prune_end=5.5)  # steps 45..55: k0 == kf == 2
    with pytest.raises(ConfigError):
        GraNet(model, opt, c, total_steps=TOTAL, steps_per_epoch=SPE)


def test_engine_rejects_bad_step_counts_and_models_without_weights() -> None:
    model = tiny_model()
    opt = make_optimizer(model, "sgd")
    with pytest.raises(ConfigError):
        GraNet(model, opt, cfg(), total_steps=0, steps_per_epoch=SPE)
    with pytest.raises(ConfigError):
        GraNet(model, opt, cfg(), total_steps=TOTAL, steps_per_epoch=0)
    bn = nn.Sequential(nn.BatchNorm1d(4))
    with pytest.raises(ConfigError):
        GraNet(
            bn, torch.optim.SGD(bn.parameters(), lr=0.1), cfg(), total_steps=9, steps_per_epoch=3
        )
