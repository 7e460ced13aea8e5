"""GraNet: the stateful hook a training loop calls after ``optimizer.step()``.

It owns the bool masks of the prunable weights, keeps inactive weights and their optimizer
state at exactly zero, runs the mask update every ``update_interval`` steps (gradual magnitude
pruning, then regeneration, as the method's row of ``config.METHODS`` says) and records
per-update statistics and FLOPs. All decisions are delegated to the pure functions of this
package; the only cross-worker communication goes through a small ``MaskSync`` object (see
``granet_ray.distributed``). Between mask updates ``step()`` never waits for the device; a
mask update waits for it a fixed few times, whatever the number of layers (the finite-gradient
check, the layers' counts after a prune, the statistics), plus what ``MaskSync`` needs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from granet_ray.config import ConfigError, GraNetConfig
from granet_ray.sparsity.allocation import erk_densities, initial_masks, uniform_densities
from granet_ray.sparsity.criteria import (
    TieBreak,
    active_counts,
    global_magnitude_prune,
    layerwise_magnitude_prune,
    prune_and_regrow,
    random_scores,
    regrow_count,
)
from granet_ray.sparsity.flops import FlopsRecorder, relative_flops
from granet_ray.sparsity.layers import unwrap, weight_table
from granet_ray.sparsity.schedules import pruning_updates, regrow_fraction, target_density

Tensors = dict[str, torch.Tensor]

# Weight-shaped optimizer state whose neutral value is 0 (docs/algorithm.md section 2): masked
# with the weight, so a newly grown weight starts with no history. By optimizer class (and its
# bases).
NEUTRAL_STATE: dict[type[torch.optim.Optimizer], tuple[str, ...]] = {
    torch.optim.SGD: ("momentum_buffer",),
    torch.optim.Adam: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.AdamW: ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    torch.optim.RMSprop: ("square_avg", "momentum_buffer", "grad_avg"),
    torch.optim.Adagrad: ("sum",),
}
# State of optimizers docs/algorithm.md section 2 refuses, named in the error.
NON_NEUTRAL_STATE: dict[type[torch.optim.Optimizer], str] = {
    torch.optim.Rprop: "'step_size' (starts at lr)",
    torch.optim.LBFGS: "'old_dirs' / 'old_stps' (a curvature history over all weights together)",
}


def neutral_state_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The optimizer's weight-shaped state keys that are neutral at 0; ``ConfigError`` naming
    the optimizer (and the state) when the engine cannot keep a grown weight's state right."""
    kind = type(optimizer).__name__
    for cls in type(optimizer).__mro__:
        if cls in NEUTRAL_STATE:
            break
    else:
        supported = ", ".join(c.__name__ for c in NEUTRAL_STATE)
        known = next((v for c, v in NON_NEUTRAL_STATE.items() if isinstance(optimizer, c)), None)
        state = f"its state {known} is not" if known else "its state is not known to be"
        raise ConfigError(
            f"optimizer={kind} is invalid: {state} neutral at 0, so a regrown weight would "
            f"inherit stale state; use one of {supported}"
        )
    if cls is torch.optim.Adagrad:
        for group in optimizer.param_groups:
            if group.get("initial_accumulator_value", 0) != 0:
                raise ConfigError(
                    f"optimizer={kind} is invalid: its state 'sum' starts at "
                    f"initial_accumulator_value={group['initial_accumulator_value']}, not 0, "
                    "so a regrown weight's state cannot be reset to it; use 0"
                )
    return NEUTRAL_STATE[cls]


class MaskSync(Protocol):
    """How workers agree on masks: average scores before an update, verify masks after."""

    world_size: int

    def average(self, tensors: Tensors) -> Tensors:
        """The element-wise mean of each tensor across workers (same keys, same shapes)."""
        ...

    def all(self, flag: bool) -> bool:
        """True iff ``flag`` is True on every worker."""
        ...

    def check(self, masks: Tensors, step: int) -> None:
        """Raise if any worker's masks differ from the others', naming the layer and step."""
        ...


class LocalSync:
    """A single process: nothing to average, nothing to compare."""

    world_size = 1

    def average(self, tensors: Tensors) -> Tensors:
        return tensors

    def all(self, flag: bool) -> bool:
        return flag

    def check(self, masks: Tensors, step: int) -> None:
        return None


class GraNet:
    """Sparse training engine (docs/algorithm.md sections 1-6).

    Args:
        model: the network (may be wrapped in DDP or ``torch.compile``); its Conv / Linear
            weights and attention projections are prunable (``sparsity/layers.py``: not when
            frozen, shared with an embedding or kept dense by the config), named as in the
            plain model, each parameter once.
        optimizer: its weight-shaped state that is neutral at 0 is masked with the weights
            (``NEUTRAL_STATE``); other optimizers are refused with a ``ConfigError``.
        config: method and schedule; epochs in it are converted with ``steps_per_epoch``.
        total_steps: T, global optimizer steps of the whole run.
        steps_per_epoch: global optimizer steps per epoch (the same at any worker count).
        sync: cross-worker agreement; ``LocalSync`` (default) for one process.

    The constructor applies the initial masks to the model. To resume, build the engine
    first, then load the model, optimizer and engine states (``load_state_dict``).
    ``mask_listeners``: callables run after every change of the masks (a mask update, a
    load), e.g. to rebuild what depends on them outside a training step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: GraNetConfig,
        *,
        total_steps: int,
        steps_per_epoch: int,
        sync: MaskSync | None = None,
    ) -> None:
        if total_steps <= 0 or steps_per_epoch <= 0:
            raise ConfigError(
                f"total_steps={total_steps} and steps_per_epoch={steps_per_epoch} "
                "must both be positive"
            )
        self.config = config
        self.spec = config.spec
        self.optimizer = optimizer
        self._state_keys = neutral_state_keys(optimizer)
        self.total_steps = total_steps
        self.sync: MaskSync = sync or LocalSync()
        # every candidate weight, each parameter once, and why it stays dense (layers.py)
        self.layers = weight_table(
            model,
            dense_first=config.dense_first,
            dense_last=config.dense_last,
            keep_dense=config.keep_dense,
        )
        self.params = {n: w.param for n, w in self.layers.items() if w.prunable}
        if not self.params:
            raise ConfigError(
                "the model has no prunable weights: no Conv*d, Linear or attention projection "
                "that trains and is not kept dense"
            )
        self.prune_start = round(config.prune_start * steps_per_epoch)
        self.prune_end = round(config.prune_end * steps_per_epoch)
        if config.regrow_end is not None:
            self.regrow_end = round(config.regrow_end * steps_per_epoch)
        else:
            self.regrow_end = math.floor(self.spec.regrow_end * total_steps)
        # the cosine's period: the whole run (GraNet) or up to the end of regrowth (RigL)
        self.anneal_steps = max(1, total_steps if self.spec.anneal == "total" else self.regrow_end)
        self._check_window(steps_per_epoch)
        self.step_count = 0
        # the due step of a postponed update (docs/algorithm.md section 2)
        self.pending: int | None = None
        self._superseded: list[int] = []  # postponed updates a later due update replaced
        self.history: list[dict[str, Any]] = []
        self.mask_listeners: list[Callable[[], None]] = []
        self._net = unwrap(model)
        self._flops = FlopsRecorder(model)
        self._density_steps = dict.fromkeys(self.params, 0.0)
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        if config.start_density >= 1.0:
            masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        else:
            allocate = erk_densities if config.init_allocation == "erk" else uniform_densities
            densities = allocate(shapes, config.start_density)
            masks = initial_masks(shapes, densities, config.seed)
        self._set_masks(masks)
        self.apply_masks()
        self._warn_empty({n: p.numel() for n, p in self.params.items()}, self._active, 0)

    def _check_window(self, steps_per_epoch: int) -> None:
        cfg = self.config
        if not cfg.prunes:
            return
        if self.prune_end > self.total_steps:
            raise ConfigError(
                f"granet.prune_end={cfg.prune_end} epochs = step {self.prune_end} is after "
                f"the last step ({self.total_steps}): pruning would never reach final_density"
            )
        window = pruning_updates(
            update_interval=cfg.update_interval,
            prune_start=self.prune_start,
            prune_end=self.prune_end,
        )
        if window == 0 and cfg.final_density < cfg.start_density:
            steps = self.prune_end - self.prune_start
            # A shorter interval helps only where the window holds a step after its start.
            shorter = (
                f"pass --update-interval {steps // 2 or 1} or smaller, or "
                if steps >= 1 and cfg.update_interval > 1
                else ""
            )
            raise ConfigError(
                f"granet.prune_start..prune_end = {cfg.prune_start}..{cfg.prune_end} epochs = "
                f"steps {self.prune_start}..{self.prune_end} hold no mask update at "
                f"update_interval={cfg.update_interval} ({steps_per_epoch} steps per epoch): "
                f"{shorter}widen the window in steps (more --epochs, a later --prune-window, "
                "or a smaller --global-batch)"
            )

    # ---- masks -------------------------------------------------------------------------
    def _set_masks(self, masks: Tensors, active: dict[str, int] | None = None) -> None:
        """Keep ``masks`` in each weight's device and memory format, with multiplier copies
        in the weight's dtype for the fused masking pass. ``active``: their active counts when
        known, else counted (one host sync for all layers)."""
        self.masks = {}
        for n, p in self.params.items():
            mask = torch.empty_like(p, dtype=torch.bool)  # p's strides (channels_last too)
            mask.copy_(masks[n])
            self.masks[n] = mask
        self._active = active_counts(self.masks) if active is None else dict(active)
        self._densities = {n: self._active[n] / m.numel() for n, m in self.masks.items()}
        self._dense = all(self._active[n] == m.numel() for n, m in self.masks.items())
        self._multipliers: dict[torch.dtype, list[torch.Tensor]] = {}

    def _multiplier(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        cached = self._multipliers.setdefault(dtype, [])
        if not cached:
            cached.extend(self.masks[n].to(dtype) for n in self.params)
        return cached[index]

    @torch.no_grad()
    def apply_masks(self) -> None:
        """weight *= mask and every neutral-at-0 weight-shaped optimizer state *= mask, in one
        fused pass per dtype (``torch._foreach_mul_``); nothing to do while every mask is all
        ones. No host sync."""
        if self._dense:
            return
        groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for i, p in enumerate(self.params.values()):
            state = self.optimizer.state.get(p, {})
            for tensor in (p, *(state.get(k) for k in self._state_keys)):
                if torch.is_tensor(tensor) and tensor.shape == p.shape:
                    targets, factors = groups.setdefault(tensor.dtype, ([], []))
                    targets.append(tensor)
                    factors.append(self._multiplier(i, tensor.dtype))
        for targets, factors in groups.values():
            torch._foreach_mul_(targets, factors)

    # ---- the training-loop hook ---------------------------------------------------------
    def step(self) -> dict[str, Any] | None:
        """Call once after every ``optimizer.step()`` (also one the GradScaler skipped).
        Returns the update's statistics when the masks were updated, else None.

        A due update whose gradients are not all finite on every worker is postponed to the
        next step with finite gradients and then runs with the schedule values of the step
        it was due at (docs/algorithm.md section 2); a second due step before then supersedes
        it (listed in the update's ``superseded``; its prune target still counts, see
        ``_update``)."""
        self.step_count += 1
        for n, d in self._densities.items():
            self._density_steps[n] += d
        self.apply_masks()
        t = self.step_count
        if self._is_due(t):
            if self.pending is not None:  # non-finite gradients for a whole interval
                self._superseded.append(self.pending)
            self.pending = t
        if self.pending is None:
            return None
        if not self.sync.all(self._gradients_finite()):
            return None
        due, self.pending = self.pending, None
        stats = self._update(t, due)
        self.apply_masks()
        self._masks_changed()
        return stats

    def _masks_changed(self) -> None:
        for listener in self.mask_listeners:
            listener()

    def active_counts(self) -> dict[str, int]:
        """Each prunable weight's number of active positions (known to the host: no sync)."""
        return dict(self._active)

    def _is_due(self, t: int) -> bool:
        return self._prune_target(t) is not None or self._regrow_fraction(t) is not None

    def _gradients_finite(self) -> bool:
        """Whether every gradient the optimizer holds is finite (one host sync)."""
        grads = [
            p.grad
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _prune_target(self, t: int) -> float | None:
        if not self.config.prunes:
            return None
        return target_density(
            t,
            update_interval=self.config.update_interval,
            prune_start=self.prune_start,
            prune_end=self.prune_end,
            init_density=self.config.start_density,
            final_density=self.config.final_density,
        )

    def _regrow_fraction(self, t: int) -> float | None:
        cfg = self.config
        due = t % cfg.update_interval == 0 and t >= self.prune_start
        if not (cfg.regrows and due and t <= self.regrow_end and t < self.total_steps):
            return None
        fraction = regrow_fraction(t, self.anneal_steps, cfg.initial_fraction, cfg.min_fraction)
        return fraction if fraction > 0 else None

    def reads_gradients(self, step: int) -> bool:
        """Whether ``engine.step()`` after optimizer step ``step`` may rank the dense
        gradient of every weight: an update due at ``step``, or postponed to it, regrows by
        gradient. A communication hook must then all-reduce them densely."""
        if self.spec.regrow != "gradient":
            return False
        postponed = self.pending is not None and self._regrow_fraction(self.pending) is not None
        return postponed or self._regrow_fraction(step) is not None

    @torch.no_grad()
    def _update(self, t: int, due: int) -> dict[str, Any]:
        """The mask update due at step ``due``, run at step ``t`` (docs/algorithm.md section
        3). A prune of a superseded update is not lost: the cubic schedule never rises, so the
        lowest target of the superseded and the due update is the latest one (the last prune
        still lands on d_f when its update is superseded by a regrow-only one). Ties break by
        the update's ``TieBreak`` keys. Two host syncs: the layers' counts after a prune, the
        number of newly grown weights per layer."""
        targets = (self._prune_target(s) for s in (*self._superseded, due))
        prune_to = min((d for d in targets if d is not None), default=None)
        fraction = self._regrow_fraction(due)
        update = due // self.config.update_interval
        ties = TieBreak(self.config.seed, update)
        names = sorted(self.params)
        weights = {n: self.params[n].detach().abs() for n in names}
        grads: Tensors = {}
        if fraction is not None and self.spec.regrow == "gradient":
            for n in names:
                grad = self.params[n].grad
                grads[n] = torch.zeros_like(weights[n]) if grad is None else grad.detach()
        if self.sync.world_size > 1:  # decide on the workers' mean |w| and mean gradient
            named = {f"w/{n}": w for n, w in weights.items()}
            named.update({f"g/{n}": g for n, g in grads.items()})
            scores = self.sync.average(named)
            weights = {n: scores[f"w/{n}"] for n in names}
            grads = {n: scores[f"g/{n}"] for n in grads}
        before = dict(self._active)
        masks = self.masks
        if prune_to is not None:
            prune = (
                global_magnitude_prune if self.config.global_prune else layerwise_magnitude_prune
            )
            masks = prune(weights, masks, prune_to, ties, before)
            self._set_masks(masks)
            self.apply_masks()  # section 3a: a pruned weight is gone before regrowth
        pruned, active = self.masks, dict(self._active)
        self._warn_empty(before, active, t)
        if fraction is not None:
            if self.spec.regrow == "random":
                grads = random_scores(pruned, self.config.seed, update)
            masks = prune_and_regrow(weights, grads, pruned, fraction, ties, active)
        self.sync.check(masks, t)
        self._set_masks(masks, active)  # regrowth keeps every layer's count
        if fraction is None:
            grown = dict.fromkeys(names, 0)
        else:  # inactive before (b)
            grown = active_counts({n: masks[n] & ~pruned[n] for n in names})
        layers = {}
        for n in names:
            regrown = 0 if fraction is None else regrow_count(fraction, active[n])
            layers[n] = {
                "density": self._densities[n],
                "pruned": before[n] - active[n],  # (a) never revives: all are removals
                "removed": regrown,  # (b) removes r_l and regrows r_l
                "regrown": regrown,
                "grown": grown[n],
                "rekept": regrown - grown[n],  # removed and regrown in the same (b)
            }
        stats: dict[str, Any] = {
            "step": t,
            "due_step": due,
            "update": update,
            "target_density": prune_to,
            "density": self.density(),
            "regrow_fraction": fraction,
            "layers": layers,
        }
        for key in ("pruned", "removed", "regrown", "grown", "rekept"):
            stats[key] = sum(v[key] for v in layers.values())
        if self._superseded:
            stats["superseded"], self._superseded = self._superseded, []
        self.history.append(stats)
        return stats

    def _warn_empty(self, before: dict[str, int], after: dict[str, int], t: int) -> None:
        """Warn once for every layer the initial masks (``t`` = 0) or a prune left without an
        active weight: regrowth keeps a layer's count, so such a layer stays empty (its output
        constant) for good."""
        empty = sorted(n for n in after if after[n] == 0 and before[n] > 0)
        if empty:
            warnings.warn(
                f"the masks of step {t} leave {len(empty)} layer(s) without an active weight "
                f"({', '.join(empty)}): they can never regrow; raise granet.final_density "
                f"(now {self.config.final_density}) or keep them dense (granet.dense_first, "
                "granet.dense_last)",
                stacklevel=3,
            )

    # ---- reporting ----------------------------------------------------------------------
    def density(self) -> float:
        """Fraction of prunable weights that are active."""
        return sum(self._active.values()) / sum(m.numel() for m in self.masks.values())

    def next_update_step(self) -> int | None:
        """The next optimizer step at which the masks may change, or None."""
        if self.pending is not None:
            return self.step_count + 1
        interval = self.config.update_interval
        t = (self.step_count // interval + 1) * interval
        while t <= self.total_steps:
            if self._is_due(t):
                return t
            t += interval
        return None

    def measure_flops(self, sample: torch.Tensor) -> None:
        """Record every layer's dense forward FLOPs now, by one eager forward of the input
        batch ``sample`` through the plain model (eval mode, no gradients). Call it before
        the first forward of a ``torch.compile``'d model, whose graph then holds no hook."""
        self._flops.measure(self._net, sample)

    def inference_flops(self) -> float | None:
        """Forward FLOPs of the current sparse model / dense, over all Conv / Linear layers
        (kept-dense layers count at density 1). None before the first forward pass."""
        if not self._flops.flops:
            return None
        return relative_flops(self._flops.flops, self._densities)

    def training_flops(self) -> float | None:
        """sum_t sum_l f_l d_l(t) / (t * sum_l f_l) over the steps so far (docs/algorithm.md
        section 6)."""
        if not self._flops.flops or self.step_count == 0:
            return None
        mean = {n: s / self.step_count for n, s in self._density_steps.items()}
        return relative_flops(self._flops.flops, mean)

    def summary(self) -> dict[str, Any]:
        """Per-weight rows (name, shape, kind, density, dense forward FLOPs per sample,
        prunable, why it stays dense, the other modules sharing it) plus global density and
        relative inference / training FLOPs."""
        rows = [
            {
                "name": n,
                "shape": list(w.param.shape),
                "kind": w.kind,
                "density": self._densities.get(n, 1.0),
                "prunable": w.prunable,
                "dense": w.dense,
                "shared": list(w.shared),
                "flops": self._flops.flops.get(n),
            }
            for n, w in self.layers.items()
        ]
        return {
            "step": self.step_count,
            "density": self.density(),
            "inference_flops": self.inference_flops(),
            "training_flops": self.training_flops(),
            "layers": rows,
        }

    # ---- resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "pending": self.pending,
            "superseded": list(self._superseded),
            "masks": {n: m.cpu() for n, m in self.masks.items()},
            "density_steps": dict(self._density_steps),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step counter, masks and statistics; re-applies the masks."""
        missing = set(self.params) ^ set(state["masks"])
        if missing:
            raise ValueError(
                f"engine state does not match the model's prunable layers: {sorted(missing)}"
            )
        for n, m in state["masks"].items():
            if tuple(m.shape) != tuple(self.params[n].shape):
                raise ValueError(
                    f"engine state mask {n} has shape {tuple(m.shape)}, "
                    f"the model's weight has {tuple(self.params[n].shape)}"
                )
        self.step_count = int(state["step"])
        self.pending = state.get("pending")
        self._superseded = list(state.get("superseded", []))
        self._density_steps = {n: float(v) for n, v in state["density_steps"].items()}
        self.history = list(state["history"])
        self._set_masks({n: m.bool() for n, m in state["masks"].items()})
        self.apply_masks()
        self._masks_changed()
