"""GraNet: the stateful hook a training loop calls after ``optimizer.step()``.

It owns the bool masks of the prunable weights, keeps inactive weights and their optimizer
state at exactly zero, runs the mask update every ``update_interval`` steps (gradual magnitude
pruning, then zero-cost regeneration) and records per-update statistics and FLOPs.
All decisions are delegated to the pure functions of this package; the only cross-worker
communication goes through a small ``MaskSync`` object (see ``granet_ray.distributed``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import nn

from granet_ray.config import ConfigError, GraNetConfig
from granet_ray.sparsity.allocation import erk_densities, initial_masks, uniform_densities
from granet_ray.sparsity.criteria import (
    global_magnitude_prune,
    layerwise_magnitude_prune,
    prune_and_regrow,
    random_scores,
)
from granet_ray.sparsity.flops import FlopsRecorder, relative_flops
from granet_ray.sparsity.layers import prunable_parameters, weight_layers
from granet_ray.sparsity.schedules import pruning_updates, regrow_fraction, target_density

Tensors = dict[str, torch.Tensor]


class MaskSync(Protocol):
    """How workers agree on masks: average scores before an update, verify masks after."""

    world_size: int

    def average(self, tensors: Tensors) -> Tensors:
        """The element-wise mean of each tensor across workers (same keys, same shapes)."""
        ...

    def check(self, masks: Tensors, step: int) -> None:
        """Raise if any worker's masks differ from the others', naming the layer and step."""
        ...


class LocalSync:
    """A single process: nothing to average, nothing to compare."""

    world_size = 1

    def average(self, tensors: Tensors) -> Tensors:
        return tensors

    def check(self, masks: Tensors, step: int) -> None:
        return None


class GraNet:
    """Sparse training engine (spec sections 1-6).

    Args:
        model: the network (may be DDP-wrapped); its Conv / Linear weights are prunable.
        optimizer: its weight-shaped state tensors are masked with the weights.
        config: method and schedule; epochs in it are converted with ``steps_per_epoch``.
        total_steps: T, optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch on one worker.
        sync: cross-worker agreement; ``LocalSync`` (default) for one process.

    The constructor applies the initial masks to the model. To resume, build the engine
    first, then load the model, optimizer and engine states (``load_state_dict``).
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
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.sync: MaskSync = sync or LocalSync()
        self.params = prunable_parameters(
            model, dense_first=config.dense_first, dense_last=config.dense_last
        )
        if not self.params:
            raise ConfigError("the model has no prunable Conv*d or Linear weights")
        self._layer_shapes = {n: tuple(m.weight.shape) for n, m in weight_layers(model).items()}
        self.prune_start = round(config.prune_start * steps_per_epoch)
        self.prune_end = round(config.prune_end * steps_per_epoch)
        if config.regrow_end is not None:
            self.regrow_end = round(config.regrow_end * steps_per_epoch)
        elif config.method == "rigl":
            self.regrow_end = math.floor(0.75 * total_steps)
        else:
            self.regrow_end = total_steps
        if config.prunes and self.prune_end > total_steps:
            raise ConfigError(
                f"granet.prune_end={config.prune_end} epochs = step {self.prune_end} is after "
                f"the last step ({total_steps}): pruning would never reach final_density"
            )
        if config.prunes and config.final_density < config.start_density:
            updates = pruning_updates(
                update_interval=config.update_interval,
                prune_start=self.prune_start,
                prune_end=self.prune_end,
            )
            if updates == 0:
                raise ConfigError(
                    f"granet.prune_start..prune_end = {config.prune_start}..{config.prune_end} "
                    f"epochs = steps {self.prune_start}..{self.prune_end} hold no mask update "
                    f"at update_interval={config.update_interval}: widen the window or lower "
                    "update_interval"
                )
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self._flops = FlopsRecorder(model)
        self._density_steps = dict.fromkeys(self.params, 0.0)
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        if config.start_density >= 1.0:
            masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        else:
            allocate = erk_densities if config.init_allocation == "erk" else uniform_densities
            densities = allocate(shapes, config.start_density)
            masks = initial_masks(shapes, densities, config.seed, device=self._device)
        self._set_masks(masks)
        self.apply_masks()

    @property
    def _device(self) -> torch.device:
        return next(iter(self.params.values())).device

    # ---- masks -------------------------------------------------------------------------
    def _set_masks(self, masks: Tensors) -> None:
        self.masks = {n: masks[n].to(self.params[n].device) for n in self.params}
        self._inactive = {n: ~m for n, m in self.masks.items()}
        self._active = {n: int(m.count_nonzero()) for n, m in self.masks.items()}
        self._densities = {n: self._active[n] / m.numel() for n, m in self.masks.items()}

    @torch.no_grad()
    def apply_masks(self) -> None:
        """weight *= mask and every weight-shaped optimizer state tensor *= mask."""
        for n, p in self.params.items():
            inactive = self._inactive[n]
            p.masked_fill_(inactive, 0.0)
            for value in self.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.masked_fill_(inactive, 0.0)

    # ---- the training-loop hook ---------------------------------------------------------
    def step(self) -> dict[str, Any] | None:
        """Call once after every ``optimizer.step()``. Returns the update's statistics on a
        mask-update step, else None."""
        self.step_count += 1
        for n, d in self._densities.items():
            self._density_steps[n] += d
        self.apply_masks()
        t = self.step_count
        prune_to = self._prune_target(t)
        regrow = self._regrow_fraction(t)
        if prune_to is None and regrow is None:
            return None
        stats = self._update(t, prune_to, regrow)
        self.apply_masks()
        return stats

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
        return regrow_fraction(t, self.total_steps, cfg.regrow_fraction, cfg.regrow_min)

    @torch.no_grad()
    def _update(self, t: int, prune_to: float | None, fraction: float | None) -> dict[str, Any]:
        update = t // self.config.update_interval
        names = sorted(self.params)
        weights = {n: self.params[n].detach() for n in names}
        grads: Tensors = {}
        if fraction is not None and self.config.method != "set":
            for n in names:
                grad = self.params[n].grad
                grads[n] = torch.zeros_like(weights[n]) if grad is None else grad.detach()
        if self.sync.world_size > 1:  # decide on the workers' mean |w| and mean gradient
            scores = self.sync.average(
                {
                    **{f"w/{n}": w.abs() for n, w in weights.items()},
                    **{f"g/{n}": g for n, g in grads.items()},
                }
            )
            weights = {n: scores[f"w/{n}"] for n in names}
            grads = {n: scores[f"g/{n}"] for n in grads}
        before = self.masks
        masks = before
        if prune_to is not None:
            prune = (
                global_magnitude_prune if self.config.global_prune else layerwise_magnitude_prune
            )
            masks = prune(weights, masks, prune_to)
        after_prune = masks
        if fraction is not None:
            if self.config.method == "set":
                grads = random_scores(masks, self.config.seed, update)
            masks = prune_and_regrow(weights, grads, masks, fraction)
        self.sync.check(masks, t)
        self._set_masks(masks)
        layers = {
            n: {
                "density": self._densities[n],
                "pruned": int((before[n] & ~after_prune[n]).count_nonzero()),
                "regrown": int((masks[n] & ~after_prune[n]).count_nonzero()),
            }
            for n in names
        }
        stats = {
            "step": t,
            "update": update,
            "target_density": prune_to,
            "density": self.density(),
            "regrow_fraction": fraction,
            "pruned": sum(v["pruned"] for v in layers.values()),
            "regrown": sum(v["regrown"] for v in layers.values()),
            "layers": layers,
        }
        self.history.append(stats)
        return stats

    # ---- reporting ----------------------------------------------------------------------
    def density(self) -> float:
        """Fraction of prunable weights that are active."""
        return sum(self._active.values()) / sum(m.numel() for m in self.masks.values())

    def layer_densities(self) -> dict[str, float]:
        return dict(self._densities)

    def next_update_step(self) -> int | None:
        """The next optimizer step at which the masks may change, or None."""
        interval = self.config.update_interval
        t = (self.step_count // interval + 1) * interval
        while t <= self.total_steps:
            if self._prune_target(t) is not None or self._regrow_fraction(t) is not None:
                return t
            t += interval
        return None

    def inference_flops(self) -> float | None:
        """Forward FLOPs of the current sparse model / dense, over all Conv / Linear layers
        (kept-dense layers count at density 1). None before the first forward pass."""
        if not self._flops.flops:
            return None
        return relative_flops(self._flops.flops, self._densities)

    def training_flops(self) -> float | None:
        """sum_t sum_l f_l d_l(t) / (t * sum_l f_l) over the steps so far (spec section 6)."""
        if not self._flops.flops or self.step_count == 0:
            return None
        mean = {n: s / self.step_count for n, s in self._density_steps.items()}
        return relative_flops(self._flops.flops, mean)

    def summary(self) -> dict[str, Any]:
        """Per-layer rows (name, shape, density, dense forward FLOPs per sample, prunable)
        plus global density and relative inference / training FLOPs."""
        rows = [
            {
                "name": n,
                "shape": list(shape),
                "density": self._densities.get(n, 1.0),
                "prunable": n in self.params,
                "flops": self._flops.flops.get(n),
            }
            for n, shape in self._layer_shapes.items()
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
        self._density_steps = {n: float(v) for n, v in state["density_steps"].items()}
        self.history = list(state["history"])
        self._set_masks({n: m.bool() for n, m in state["masks"].items()})
        self.apply_masks()
