"""Typed, validated configuration: the GraNet method and schedule, the training recipe, presets.

Units: densities are fractions of weights kept, in (0, 1]; ``update_interval`` is in optimizer
steps; ``prune_start``, ``prune_end``, ``regrow_end`` and ``epochs`` are in epochs (converted to
steps from the real per-worker loader length, so a schedule means the same at any worker count).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

METHODS = ("granet", "granet_uniform", "gmp", "rigl", "set", "static")
ALLOCATIONS = ("erk", "uniform")
OPTIMIZERS = ("sgd", "adam")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed range."""


def _check(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value!r} is invalid: must be {allowed}")


def _check_density(field_name: str, value: Any) -> None:
    _check(
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0,
        field_name,
        value,
        "a number in (0, 1]",
    )


@dataclass(frozen=True)
class GraNetConfig:
    """The sparse-training method and its schedule (spec sections 1-4).

    method: granet | granet_uniform | gmp | rigl | set | static.
    init_density: d_i, density at step 0 (1.0 = dense-to-sparse). gmp always starts dense and
        rigl / set / static always start at ``final_density``; see ``start_density``.
    final_density: d_f, density after the last prune.
    update_interval: dT, optimizer steps between mask updates.
    prune_start, prune_end: gradual-pruning window t0, tf in epochs.
    regrow_fraction: p0, initial regeneration fraction; regrow_min: p_min.
    regrow_end: last epoch with regrowth (None: until the end; rigl defaults to 75% of training).
    allocation: erk | uniform, per-layer initial densities when starting sparse.
    dense_first, dense_last: keep the first conv / last linear layer dense (not prunable).
    seed: seeds every random draw, together with the update index and the layer name.
    """

    method: str = "granet"
    init_density: float = 1.0
    final_density: float = 0.1
    update_interval: int = 1000
    prune_start: float = 0.0
    prune_end: float = 80.0
    regrow_fraction: float = 0.5
    regrow_min: float = 0.005
    regrow_end: float | None = None
    allocation: str = "erk"
    dense_first: bool = False
    dense_last: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "method", self.method, f"one of {', '.join(METHODS)}")
        _check(
            self.allocation in ALLOCATIONS,
            "allocation",
            self.allocation,
            f"one of {', '.join(ALLOCATIONS)}",
        )
        _check_density("init_density", self.init_density)
        _check_density("final_density", self.final_density)
        if self.method in ("granet", "granet_uniform"):
            _check(
                self.final_density <= self.init_density,
                "final_density",
                self.final_density,
                f"<= init_density ({self.init_density})",
            )
        _check(
            isinstance(self.update_interval, int)
            and not isinstance(self.update_interval, bool)
            and self.update_interval > 0,
            "update_interval",
            self.update_interval,
            "a positive integer number of optimizer steps",
        )
        _check(
            isinstance(self.prune_start, (int, float)) and self.prune_start >= 0,
            "prune_start",
            self.prune_start,
            "a number of epochs >= 0",
        )
        _check(
            isinstance(self.prune_end, (int, float)) and self.prune_end > self.prune_start,
            "prune_end",
            self.prune_end,
            f"a number of epochs > prune_start ({self.prune_start})",
        )
        _check(
            isinstance(self.regrow_min, (int, float)) and 0.0 <= self.regrow_min <= 1.0,
            "regrow_min",
            self.regrow_min,
            "a number in [0, 1]",
        )
        _check(
            isinstance(self.regrow_fraction, (int, float))
            and self.regrow_min <= self.regrow_fraction <= 1.0,
            "regrow_fraction",
            self.regrow_fraction,
            f"a number in [regrow_min ({self.regrow_min}), 1]",
        )
        if self.regrow_end is not None:
            _check(
                isinstance(self.regrow_end, (int, float)) and self.regrow_end > 0,
                "regrow_end",
                self.regrow_end,
                "a number of epochs > 0, or None",
            )
        _check(isinstance(self.seed, int), "seed", self.seed, "an integer")

    @property
    def start_density(self) -> float:
        """Density of the initial masks for this method (spec section 4)."""
        if self.method == "gmp":
            return 1.0
        if self.method in ("rigl", "set", "static"):
            return self.final_density
        return self.init_density

    @property
    def prunes(self) -> bool:
        return self.method in ("granet", "granet_uniform", "gmp")

    @property
    def regrows(self) -> bool:
        return self.method in ("granet", "granet_uniform", "rigl", "set")

    @property
    def global_prune(self) -> bool:
        return self.method != "granet_uniform"

    @property
    def init_allocation(self) -> str:
        return "uniform" if self.method == "granet_uniform" else self.allocation

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraNetConfig:
        return _from_dict(cls, data, "granet")


_DEMO_GRANET = GraNetConfig(
    method="granet",
    init_density=0.5,
    final_density=0.1,
    update_interval=20,
    prune_start=0,
    prune_end=4,
)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe: model, data, optimizer, LR schedule and the GraNet config.

    The defaults are the offline MNIST-5k demo (preset ``mnist_demo``). train_size keeps only
    that many training samples (None: all; for synthetic_imagenet, its size). batch_size is
    per worker. lr_milestones are epochs where the LR is multiplied by lr_gamma; warmup_epochs
    ramps the LR linearly from 0 first. weight_decay_norm=False exempts the parameters of
    normalization layers from weight decay.
    """

    model: str = "mnist_convnet"
    dataset: str = "mnist5k"
    data_root: str | None = None
    train_size: int | None = None
    epochs: int = 8
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    weight_decay_norm: bool = True
    lr_milestones: tuple[int, ...] = (6,)
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    amp: bool = False
    seed: int = 0
    granet: GraNetConfig = field(default_factory=lambda: _DEMO_GRANET)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.epochs, int) and self.epochs > 0,
            "epochs",
            self.epochs,
            "a positive integer",
        )
        _check(
            self.train_size is None
            or (
                isinstance(self.train_size, int)
                and not isinstance(self.train_size, bool)
                and self.train_size > 0
            ),
            "train_size",
            self.train_size,
            "None or a positive integer",
        )
        _check(
            isinstance(self.batch_size, int) and self.batch_size > 0,
            "batch_size",
            self.batch_size,
            "a positive integer (per worker)",
        )
        _check(
            self.optimizer in OPTIMIZERS,
            "optimizer",
            self.optimizer,
            f"one of {', '.join(OPTIMIZERS)}",
        )
        _check(
            isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr),
            "lr",
            self.lr,
            "a finite number > 0",
        )
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "a number in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(0.0 < self.lr_gamma <= 1.0, "lr_gamma", self.lr_gamma, "a number in (0, 1]")
        _check(
            all(0 < m <= self.epochs for m in self.lr_milestones),
            "lr_milestones",
            self.lr_milestones,
            f"epochs in (0, epochs={self.epochs}]",
        )
        _check(
            0.0 <= self.warmup_epochs < self.epochs,
            "warmup_epochs",
            self.warmup_epochs,
            f"a number in [0, epochs={self.epochs})",
        )
        _check(
            0.0 <= self.label_smoothing < 1.0,
            "label_smoothing",
            self.label_smoothing,
            "a number in [0, 1)",
        )
        if self.granet.prunes:
            _check(
                self.granet.prune_end <= self.epochs,
                "granet.prune_end",
                self.granet.prune_end,
                f"<= epochs ({self.epochs}) when the method prunes",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for Ray's ``train_loop_config`` and checkpoint metadata)."""
        data = dataclasses.asdict(self)
        data["lr_milestones"] = list(self.lr_milestones)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        granet = data.get("granet", {})
        if not isinstance(granet, GraNetConfig):
            data["granet"] = GraNetConfig.from_dict(granet)
        if "lr_milestones" in data:
            data["lr_milestones"] = tuple(data["lr_milestones"])
        return _from_dict(cls, data, "train")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with top-level fields changed; ``granet`` may be a dict of GraNet fields."""
        granet = changes.pop("granet", None)
        if isinstance(granet, dict):
            granet = dataclasses.replace(self.granet, **granet)
        if granet is not None:
            changes["granet"] = granet
        return dataclasses.replace(self, **changes)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown {where} config field(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(names))}"
        )
    return cls(**data)


def _cifar(model: str) -> TrainConfig:
    return TrainConfig(
        model=model,
        dataset="cifar10",
        epochs=160,
        batch_size=128,
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        lr_milestones=(80, 120),
        granet=GraNetConfig(
            method="granet",
            init_density=1.0,
            final_density=0.1,
            update_interval=1000,
            prune_start=0,
            prune_end=80,
            regrow_fraction=0.5,
            allocation="erk",
        ),
    )


PRESETS: dict[str, TrainConfig] = {
    "mnist_demo": TrainConfig(),
    "cifar10_resnet20": _cifar("resnet20"),
    "cifar10_vgg19": _cifar("vgg19_bn"),
    "imagenet_resnet50": TrainConfig(
        model="resnet50",
        dataset="imagenet",
        epochs=100,
        batch_size=64,
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
        weight_decay_norm=False,
        lr_milestones=(30, 60, 90),
        warmup_epochs=5,
        label_smoothing=0.1,
        amp=True,
        granet=GraNetConfig(
            method="granet",
            init_density=0.5,
            final_density=0.2,
            update_interval=4000,
            prune_start=0,
            prune_end=30,
            regrow_fraction=0.5,
            allocation="erk",
        ),
    ),
}


def preset(name: str) -> TrainConfig:
    """The paper's settings (spec section 7) by name: ``cifar10_resnet20``, ``cifar10_vgg19``,
    ``imagenet_resnet50``, plus ``mnist_demo`` for the offline demo."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown: must be one of {', '.join(PRESETS)}")
    return PRESETS[name]
