"""Invariants of the GraNet engine (spec sections 1-6) on a tiny conv + linear model.

Every step of every run is checked against the spec: inactive weights and weight-shaped
optimizer state are exactly 0, and at every mask update the new masks equal those of a plain
sort-based reference built from the spec's formulas (cubic D_k, cosine p_t, floor / ceil
counts, ties to the lower flat index in name order), with newly grown weights at 0.
"""

from __future__ import annotations

import copy
import io
import math
from collections import OrderedDict
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from granet_ray.config import ConfigError, GraNetConfig
from granet_ray.sparsity import GraNet, erk_densities, random_scores

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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest (and identically) on one intra-op thread on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    return torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )


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


# --- an independent reference of one mask update, from the spec's words ---------------------


def _top(scores: list[float], candidates: list[int], k: int) -> set[int]:
    return set(sorted(candidates, key=lambda i: (-scores[i], i))[:k])


def _flat_set(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask.reshape(-1)).reshape(-1).tolist())


def _from_set(positions: set[int], shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(math.prod(shape), dtype=torch.bool)
    out[sorted(positions)] = True
    return out.view(shape)


def ref_prune(weights, masks, density: float, global_: bool):
    names = sorted(masks)
    if not global_:
        out = {}
        for n in names:
            keep = math.floor(density * masks[n].numel() + 1e-9)
            active = sorted(_flat_set(masks[n]))
            kept = _top(weights[n].abs().reshape(-1).tolist(), active, keep)
            out[n] = _from_set(kept if keep < len(active) else set(active), masks[n].shape)
        return out
    flat_w = torch.cat([weights[n].abs().reshape(-1) for n in names]).tolist()
    flat_m = torch.cat([masks[n].reshape(-1) for n in names])
    active = torch.nonzero(flat_m).reshape(-1).tolist()
    keep = math.floor(density * len(flat_w) + 1e-9)
    kept = _top(flat_w, active, keep) if keep < len(active) else set(active)
    out, start = {}, 0
    for n in names:
        size = masks[n].numel()
        local = {i - start for i in kept if start <= i < start + size}
        out[n] = _from_set(local, masks[n].shape)
        start += size
    return out


def ref_regrow(weights, scores, masks, fraction: float):
    out = {}
    for n, mask in masks.items():
        active = sorted(_flat_set(mask))
        r = math.ceil(fraction * len(active) - 1e-9)
        kept = _top(weights[n].abs().reshape(-1).tolist(), active, len(active) - r)
        candidates = [i for i in range(mask.numel()) if i not in kept]
        grown = _top(scores[n].abs().reshape(-1).tolist(), candidates, r)
        out[n] = _from_set(kept | grown, mask.shape)
    return out


def hand_target(c: GraNetConfig, t: int) -> float | None:
    if c.method not in ("granet", "granet_uniform", "gmp") or t % c.update_interval:
        return None
    di = 1.0 if c.method == "gmp" else c.init_density
    k, k0 = t // c.update_interval, round(c.prune_start * SPE) // c.update_interval
    kf = round(c.prune_end * SPE) // c.update_interval
    if not k0 < k <= kf:
        return None
    return c.final_density + (di - c.final_density) * (1 - (k - k0) / (kf - k0)) ** 3


def hand_fraction(c: GraNetConfig, t: int, total: int) -> float | None:
    if c.method not in ("granet", "granet_uniform", "rigl", "set") or t % c.update_interval:
        return None
    if c.regrow_end is not None:
        end = c.regrow_end * SPE
    else:
        end = 0.75 * total if c.method == "rigl" else total
    if t < round(c.prune_start * SPE) or t > end:
        return None
    return (
        c.regrow_min + (c.regrow_fraction - c.regrow_min) * (1 + math.cos(math.pi * t / total)) / 2
    )


# --- the harness ---------------------------------------------------------------------------


def _weight_states(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v) and v.shape == p.shape
    }


class Run:
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

    def forward_backward(self, t: int) -> None:
        x, y = batch(t)
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def step(self, t: int, check: bool = True) -> dict[str, Any] | None:
        self.forward_backward(t)
        if not check:
            return self.engine.step()
        eng = self.engine
        old = {n: m.clone() for n, m in eng.masks.items()}
        w = {n: self.params[n].detach().clone() * old[n] for n in old}
        st = {
            n: {k: v.clone() * old[n] for k, v in _weight_states(self.opt, self.params[n]).items()}
            for n in old
        }
        g = {n: self.params[n].grad.clone() for n in old}
        stats = eng.step()
        assert eng.step_count == t
        for n in old:  # gradients are never masked: regrowth reads them dense
            assert torch.equal(self.params[n].grad, g[n]), n
        target, fraction = hand_target(self.cfg, t), hand_fraction(self.cfg, t, self.total)
        new = eng.masks
        if target is None and fraction is None:
            assert stats is None, t
            expected = old
        else:
            assert stats is not None and stats is eng.history[-1], t
            expected = old
            if target is not None:
                expected = ref_prune(w, expected, target, self.cfg.method != "granet_uniform")
                if self.cfg.method == "granet_uniform":  # floor(D_k * n_l) per layer
                    for n, m in expected.items():
                        keep = math.floor(target * m.numel() + 1e-9)
                        assert int(m.sum()) == min(keep, int(old[n].sum()))
                else:  # floor(D_k * N) over all prunable layers
                    kept_total = sum(int(m.sum()) for m in expected.values())
                    active = sum(int(m.sum()) for m in old.values())
                    assert kept_total == min(math.floor(target * N + 1e-9), active)
            after = expected
            self.after_prune[t] = {n: int(m.sum()) for n, m in after.items()}
            if fraction is not None:
                if self.cfg.method == "set":
                    scores = random_scores(after, self.cfg.seed, t // self.cfg.update_interval)
                else:
                    scores = g
                expected = ref_regrow(w, scores, after, fraction)
                for n in after:  # regrowth keeps every layer's count exactly
                    assert int(expected[n].sum()) == int(after[n].sum())
            self._check_stats(stats, t, target, fraction, old, after, expected)
        assert set(new) == set(old)
        for n in old:
            assert torch.equal(new[n], expected[n]), (t, n)
        self._check_values(old, w, st)
        return stats

    def _check_stats(self, stats, t, target, fraction, old, after, new) -> None:
        assert stats["step"] == t
        assert stats["update"] == t // self.cfg.update_interval
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
            assert layer["pruned"] == int((old[n] & ~after[n]).sum())
            assert layer["regrown"] == int((new[n] & ~after[n]).sum())
        assert stats["pruned"] == sum(v["pruned"] for v in stats["layers"].values())
        assert stats["regrown"] == sum(v["regrown"] for v in stats["layers"].values())

    def _check_values(self, old, w, st) -> None:
        for n, mask in self.engine.masks.items():
            p = self.params[n].detach()
            states = _weight_states(self.opt, self.params[n])
            assert bool((p[~mask] == 0).all()), n  # inactive weights exactly 0
            assert torch.equal(p[mask & old[n]], w[n][mask & old[n]]), n  # kept keep value
            assert bool((p[mask & ~old[n]] == 0).all()), n  # newly grown start at 0
            for k, v in states.items():
                assert bool((v[~mask] == 0).all()), (n, k)
                assert bool((v[mask & ~old[n]] == 0).all()), (n, k)
                assert torch.equal(v[mask & old[n]], st[n][k][mask & old[n]]), (n, k)

    def run(self, start: int = 1, stop: int | None = None, check: bool = True) -> Run:
        for t in range(start, (stop or self.total) + 1):
            self.step(t, check)
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


def test_rigl_starts_at_final_density_and_stops_regrowth_at_three_quarters() -> None:
    c = cfg("rigl", final_density=0.2, init_density=1.0)
    r = Run(c)
    dens = erk_densities(LAYERS, 0.2)
    initial = r.counts()
    for n, s in LAYERS.items():
        assert abs(initial[n] - dens[n] * math.prod(s)) <= 0.5
    r.run()
    assert r.counts() == initial  # no pruning: every layer keeps its count throughout
    steps = _update_steps(r.engine.history)
    assert steps == [t for t in range(5, TOTAL + 1, DT) if t <= 0.75 * TOTAL]
    assert all(h["target_density"] is None and h["pruned"] == 0 for h in r.engine.history)


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
    assert all(torch.equal(initial[n], m) for n, m in r.engine.masks.items())


def test_regrow_end_and_prune_start() -> None:
    c = cfg(prune_start=1, prune_end=4, regrow_end=5)  # t0 = 10, regrow until t = 50
    r = Run(c).run()
    hist = r.engine.history
    assert _update_steps(hist) == list(range(10, 51, DT))
    assert [h["step"] for h in hist if h["target_density"] is not None] == list(range(15, 41, 5))
    assert hist[0]["target_density"] is None  # k == k0: regrowth only


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


def _one_layer_engine(opt_kind: str):
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    opt = make_optimizer(model, opt_kind)
    c = cfg("rigl", final_density=0.5, update_interval=10)
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
    # r = ceil(p_10 * 8) = 4: remove |w| = 1..4, regrow active[0] and the 3 best inactive
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
    assert stats["layers"]["0.weight"]["regrown"] == 3


class _FakeSync:
    """Replaces the local gradients by a fixed pattern, as an all-reduce would replace them by
    the workers' mean, and records the mask checks."""

    world_size = 2

    def __init__(self) -> None:
        self.averaged: list[set[str]] = []
        self.checked: list[tuple[int, dict[str, torch.Tensor]]] = []

    def average(self, tensors):
        self.averaged.append(set(tensors))
        out = dict(tensors)
        for key, value in tensors.items():
            if key.startswith("g/"):
                out[key] = torch.arange(value.numel(), dtype=torch.float32).view(value.shape)
        return out

    def check(self, masks, step: int) -> None:
        self.checked.append((step, {n: m.clone() for n, m in masks.items()}))


def test_decisions_use_the_averaged_scores_and_every_update_is_checked() -> None:
    """Spec section 5: the update decides on the all-reduced scores; masks are verified after."""
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
    assert sync.averaged == [{"w/0.weight", "w/1.weight", "g/0.weight", "g/1.weight"}]
    assert [s for s, _ in sync.checked] == [3]
    averaged = {
        n: torch.arange(m.numel(), dtype=torch.float32).view(m.shape) for n, m in before.items()
    }
    expected = ref_regrow(weights, averaged, before, hand_fraction(c, 3, 100))
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
    ("method", "opt", "init"),
    [("granet", "sgd", 0.5), ("granet", "adam", 1.0), ("set", "sgd", 1.0)],
)
def test_resume_from_state_dicts_equals_uninterrupted_run(
    method: str, opt: str, init: float
) -> None:
    c = cfg(method, init_density=init, final_density=0.1)
    a = Run(c, opt=opt).run(check=False)
    half = TOTAL // 2
    b = Run(c, opt=opt).run(stop=half, check=False)
    saved = _roundtrip(
        {
            "model": b.model.state_dict(),
            "optimizer": b.opt.state_dict(),
            "engine": b.engine.state_dict(),
        }
    )
    fresh = Run(c, opt=opt, model_seed=123)  # different init: everything must come from state
    fresh.model.load_state_dict(saved["model"])
    fresh.opt.load_state_dict(saved["optimizer"])
    fresh.engine.load_state_dict(saved["engine"])
    assert fresh.engine.step_count == half
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
