"""The plain-PyTorch training loop shared by the single-process run and the Ray workers:
optimizer and LR schedule from a ``TrainConfig``, one training epoch with the GraNet hook,
and evaluation. No Ray, no I/O."""

from __future__ import annotations

import bisect
import contextlib
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from granet_ray.config import TrainConfig
from granet_ray.sparsity import GraNet

_NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python ``random`` and NumPy with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or Adam. With ``weight_decay_norm=False`` the parameters of
    normalization layers (BatchNorm, GroupNorm, LayerNorm, ...) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.weight_decay_norm:
        groups: list[dict[str, Any]] = [{"params": params}]
    else:
        norm = {
            id(p)
            for m in model.modules()
            if isinstance(m, _NORM_LAYERS)
            for p in m.parameters(recurse=False)
        }
        groups = [
            {"params": [p for p in params if id(p) not in norm]},
            {"params": [p for p in params if id(p) in norm], "weight_decay": 0.0},
        ]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """LR multiplier before optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_epochs``, then x ``lr_gamma`` at each epoch of ``lr_milestones``."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return min(1.0, (step + 1) / warmup)
    milestones = sorted(m * steps_per_epoch for m in cfg.lr_milestones)
    return cfg.lr_gamma ** bisect.bisect_right(milestones, step)


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step schedule (call ``scheduler.step()`` after every step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch)
    )


@dataclass
class StepInfo:
    """What one optimizer step produced, for progress displays."""

    step: int
    loss: float
    update: dict[str, Any] | None


@dataclass
class EvalResult:
    """Sums over the evaluated samples (add them across workers before dividing)."""

    loss_sum: float
    correct: int
    count: int

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def train_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    engine: GraNet,
    *,
    device: torch.device,
    label_smoothing: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> EvalResult:
    """One epoch: forward, backward, optimizer step, LR step, then ``engine.step()``.

    With a ``scaler`` (CUDA AMP) the gradients are unscaled before the optimizer step, so the
    engine's regrowth reads true gradients. Returns the training loss and accuracy sums.
    """
    model.train()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    loss_sum, correct, count = 0.0, 0, 0
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, scaler is not None):
            logits = model(inputs)
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        update = engine.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss is {value} at step {engine.step_count}")
        loss_sum += value * len(targets)
        correct += int((logits.argmax(dim=1) == targets).sum())
        count += len(targets)
        if on_step is not None:
            on_step(StepInfo(step=engine.step_count, loss=value, update=update))
    return EvalResult(loss_sum=loss_sum, correct=correct, count=count)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    amp: bool = False,
) -> EvalResult:
    """Cross-entropy and top-1 sums over ``loader``."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    result = EvalResult(0.0, 0, 0)
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        with _autocast(device, amp):
            logits = model(inputs)
        result.loss_sum += float(loss_fn(logits.float(), targets))
        result.correct += int((logits.argmax(dim=1) == targets).sum())
        result.count += len(targets)
    return result
