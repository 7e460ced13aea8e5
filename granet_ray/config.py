"""Every configuration of a run, validated: the sparse-training method (one table of method
specs), the training recipe, where and how it runs, the paper's presets, rescaling to another
length or global batch, and preset files.

Units: densities are fractions of weights kept, in (0, 1]; ``update_interval`` is in global
optimizer steps; ``prune_start``, ``prune_end``, ``regrow_end``, ``epochs`` and
``warmup_epochs`` are in epochs of the run's global batch, so a schedule means the same at
any number of workers (docs/algorithm.md section 5). No Ray, no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed range."""


# ---- validation helpers shared by every config class ------------------------------------


def fail(field_name: str, value: Any, allowed: str) -> ConfigError:
    """The error for ``field_name=value``: ``<field>=<value!r> is invalid: must be <allowed>``."""
    return ConfigError(f"{field_name}={value!r} is invalid: must be {allowed}")


def check(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    """Raise ``fail(...)`` unless ``ok``."""
    if not ok:
        raise fail(field_name, value, allowed)


def is_int(value: Any) -> bool:
    """An integer (Python's or NumPy's) that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (Python's or NumPy's) that is not a bool: no field of any config
    means something at infinity or NaN."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# Seeds feed torch, NumPy and Python generators: a non-negative 63-bit integer fits all three.
SEED_LIMIT = 2**63


def check_seed(field_name: str, value: Any) -> None:
    """Raise unless ``value`` is a seed: an integer in [0, 2**63)."""
    check(
        is_int(value) and 0 <= value < SEED_LIMIT,
        field_name,
        value,
        "an integer in [0, 2**63)",
    )


def _normalize(config: Any) -> None:
    """Plain Python values in a frozen config, before it is validated: NumPy numbers become
    ``int`` / ``float``, a list or tuple given for a ``tuple`` field a tuple of plain values,
    and a ``bool`` field refuses anything but True / False. Lists are what Python callers
    and YAML files pass; NumPy numbers what array code passes."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = str(f.type)
        if kind == "bool":
            check(isinstance(value, bool), f.name, value, "True or False")
        elif kind.startswith("tuple["):
            check(
                isinstance(value, Sequence) and not isinstance(value, str),
                f.name,
                value,
                "a list of names" if "str" in kind else "a list of numbers",
            )
            object.__setattr__(config, f.name, tuple(_plain(v) for v in value))
        else:
            object.__setattr__(config, f.name, _plain(value))


def _plain(value: Any) -> Any:
    """A NumPy (or other non-builtin) number as the Python ``int`` / ``float`` it equals."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def check_known(keys: Iterable[str], known: Iterable[str], where: str) -> None:
    """Raise ``ConfigError`` naming every key of ``keys`` that is not in ``known``."""
    allowed = set(known)
    unknown = sorted(set(keys) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown {where} field(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
        )


def check_mapping(value: Any, known: Iterable[str], where: str) -> dict[str, Any]:
    """``value`` as a dict, after checking it is a mapping with only ``known`` keys."""
    if not isinstance(value, Mapping):
        raise fail(where, value, "a mapping of field: value")
    check_known(value, known, where)
    return dict(value)


def _density(field_name: str, value: Any) -> None:
    check(is_number(value) and 0.0 < value <= 1.0, field_name, value, "a number in (0, 1]")


def _from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    check_known(data, (f.name for f in dataclasses.fields(cls)), where)
    return cls(**data)


# ---- the methods: one table ---------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """One sparse-training method (docs/algorithm.md section 4).

    start: where the initial masks come from: ``init`` (d_i), ``dense`` (1.0) or ``final``
    (d_f). allocation: per-layer initial densities forced by the method (None: the config's
    ``allocation``). prune: gradual magnitude pruning ``global`` or per ``layer`` by default,
    None for never. regrow: the regrowth score, ``gradient`` (|dense gradient|), ``random``
    or None for no regrowth. regrow_fraction, regrow_min: default p0 and p_min of the cosine
    fraction; regrow_end: default last regrowth step as a fraction of training; anneal: the
    cosine runs over the whole run (``total``, GraNet) or reaches p_min at regrow_end
    (``end``, the RigL paper's drop fraction).
    """

    name: str
    start: str
    allocation: str | None
    prune: str | None
    regrow: str | None
    regrow_fraction: float
    regrow_min: float
    regrow_end: float
    anneal: str


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    # name, start, allocation, prune, regrow, regrow_fraction, regrow_min, regrow_end, anneal
    for spec in (
        MethodSpec("granet", "init", None, "global", "gradient", 0.5, 0.005, 1.0, "total"),
        MethodSpec(
            "granet_uniform", "init", "uniform", "layer", "gradient", 0.5, 0.005, 1.0, "total"
        ),
        MethodSpec("gmp", "dense", None, "global", None, 0.0, 0.0, 1.0, "total"),
        MethodSpec("rigl", "final", None, None, "gradient", 0.3, 0.0, 0.75, "end"),
        MethodSpec("set", "final", None, None, "random", 0.3, 0.0, 0.75, "end"),
        MethodSpec("static", "final", None, None, None, 0.0, 0.0, 1.0, "total"),
    )
}
ALLOCATIONS = ("erk", "uniform")
PRUNE_SCOPES = ("global", "layer")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("step", "cosine")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# The fields that take one of a few names, by override key (validation and flags read it).
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": OPTIMIZERS,
    "lr_schedule": LR_SCHEDULES,
    "precision": PRECISIONS,
    "granet.method": tuple(METHODS),
    "granet.prune_scope": PRUNE_SCOPES,
    "granet.allocation": ALLOCATIONS,
}


@dataclass(frozen=True)
class GraNetConfig:
    """The sparse-training method and its schedule (docs/algorithm.md sections 1-4). Every
    change to it, from flags, files or Python, goes through ``override`` (``granet.<field>``).

    Attributes:
        method: a row of ``METHODS`` (granet, granet_uniform, gmp, rigl, set, static).
        init_density: d_i (1.0 = dense-to-sparse); only the methods that start at ``init``
            use it (see ``start_density``).
        final_density: d_f, the density the run ends at (0.1 = 90% sparsity).
        update_interval: dT, global optimizer steps between mask updates.
        prune_start: t0, the gradual-pruning window's start, in epochs.
        prune_end: tf, the window's end, in epochs.
        prune_scope: ``global`` or ``layer`` pruning (None: the method's; only methods that
            prune).
        regrow_fraction: p0 (None: the method's; RigL / SET: alpha = 0.3).
        regrow_min: p_min, what the cosine anneals to (None: the method's).
        regrow_end: the last epoch with regrowth (None: the method's; RigL / SET 75% of
            training).
        allocation: ``erk`` or ``uniform`` per-layer initial densities when starting sparse.
        dense_first: keep the first conv layer dense (not prunable).
        dense_last: keep the last linear layer dense.
        keep_dense: name patterns (``fnmatch``, e.g. ``patch.*``) of weights kept dense,
            matched against parameter and module names; a comma-separated string is split.
        seed: seeds every random draw, together with the update index and the layer name.

    Raises:
        ConfigError: a field out of its range, naming the field and the range.
    """

    method: str = "granet"
    init_density: float = 1.0
    final_density: float = 0.1
    update_interval: int = 1000
    prune_start: float = 0.0
    prune_end: float = 80.0
    prune_scope: str | None = None
    regrow_fraction: float | None = None
    regrow_min: float | None = None
    regrow_end: float | None = None
    allocation: str = "erk"
    dense_first: bool = False
    dense_last: bool = False
    keep_dense: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.keep_dense, str):
            object.__setattr__(self, "keep_dense", (self.keep_dense,))
        _normalize(self)
        check(
            all(isinstance(p, str) for p in self.keep_dense),
            "keep_dense",
            self.keep_dense,
            "name patterns such as 'patch.*,head.*'",
        )
        patterns = tuple(q.strip() for p in self.keep_dense for q in p.split(",") if q.strip())
        object.__setattr__(self, "keep_dense", patterns)
        check(self.method in METHODS, "method", self.method, f"one of {', '.join(METHODS)}")
        check(
            self.allocation in ALLOCATIONS,
            "allocation",
            self.allocation,
            f"one of {', '.join(ALLOCATIONS)}",
        )
        _density("init_density", self.init_density)
        _density("final_density", self.final_density)
        if self.spec.start == "init":
            check(
                self.final_density <= self.init_density,
                "final_density",
                self.final_density,
                f"<= init_density ({self.init_density})",
            )
        check(
            is_int(self.update_interval) and self.update_interval > 0,
            "update_interval",
            self.update_interval,
            "a positive integer number of optimizer steps",
        )
        check(
            is_number(self.prune_start) and self.prune_start >= 0,
            "prune_start",
            self.prune_start,
            "a number of epochs >= 0",
        )
        check(
            is_number(self.prune_end) and self.prune_end > self.prune_start,
            "prune_end",
            self.prune_end,
            f"a number of epochs > prune_start ({self.prune_start})",
        )
        if self.prune_scope is not None:
            check(
                self.prune_scope in PRUNE_SCOPES and self.spec.prune is not None,
                "prune_scope",
                self.prune_scope,
                f"None or one of {', '.join(PRUNE_SCOPES)} for a method that prunes",
            )
        if self.regrow_min is not None:
            check(
                is_number(self.regrow_min) and 0.0 <= self.regrow_min <= 1.0,
                "regrow_min",
                self.regrow_min,
                "None or a number in [0, 1]",
            )
        if self.regrow_fraction is not None:
            check(
                is_number(self.regrow_fraction)
                and self.min_fraction <= self.regrow_fraction <= 1.0,
                "regrow_fraction",
                self.regrow_fraction,
                f"None or a number in [p_min ({self.min_fraction}), 1]",
            )
        if self.regrows:
            check(
                self.min_fraction <= self.initial_fraction,
                "regrow_min",
                self.regrow_min,
                f"<= the regrowth fraction ({self.initial_fraction})",
            )
        if self.regrow_end is not None:
            check(
                is_number(self.regrow_end) and self.regrow_end > 0,
                "regrow_end",
                self.regrow_end,
                "a number of epochs > 0, or None",
            )
        check_seed("seed", self.seed)

    @property
    def spec(self) -> MethodSpec:
        """The method's row of ``METHODS``."""
        return METHODS[self.method]

    @property
    def start_density(self) -> float:
        """Density of the initial masks for this method (docs/algorithm.md section 4)."""
        return {"init": self.init_density, "dense": 1.0, "final": self.final_density}[
            self.spec.start
        ]

    @property
    def prunes(self) -> bool:
        """Whether the method prunes gradually (docs/algorithm.md section 3a)."""
        return self.spec.prune is not None

    @property
    def regrows(self) -> bool:
        """Whether the method regrows (docs/algorithm.md section 3b)."""
        return self.spec.regrow is not None

    @property
    def global_prune(self) -> bool:
        """Pruning ranks all layers together (else each layer alone)."""
        return (self.prune_scope or self.spec.prune) == "global"

    @property
    def init_allocation(self) -> str:
        """The per-layer allocation of sparse initial masks."""
        return self.spec.allocation or self.allocation

    @property
    def initial_fraction(self) -> float:
        """p0 (GraNet) or alpha (RigL, SET): the regrowth fraction at step 0."""
        return self.spec.regrow_fraction if self.regrow_fraction is None else self.regrow_fraction

    @property
    def min_fraction(self) -> float:
        """p_min: the fraction the cosine anneals to."""
        return self.spec.regrow_min if self.regrow_min is None else self.regrow_min

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraNetConfig:
        """The config of ``data`` (field: value); fields left out keep their defaults."""
        return _from_dict(cls, data, "granet config")


_DEMO_GRANET = GraNetConfig(
    method="granet",
    init_density=0.5,
    final_density=0.1,
    update_interval=20,
    prune_start=0,
    prune_end=4,
)

# TrainConfig fields that say how a run executes, not what it computes: a run may resume
# with other values of these (another data mount, accumulation, compilation, memory format,
# how gradients travel).
RUNTIME_FIELDS = (
    "data_root",
    "max_batch_per_worker",
    "compile",
    "channels_last",
    "sparse_allreduce",
)


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe: model, data, global batch, optimizer, LR schedule, precision and
    the GraNet config. The defaults are the offline MNIST-5k demo (preset ``mnist_demo``).
    Every change to it, from flags, grid or preset files or Python, goes through
    ``override``; the global-batch rules are in docs/algorithm.md section 5.

    Attributes:
        model: a built-in name, ``pkg.module:factory`` (a user's factory, see
            ``granet_ray.reference``) or ``timm:<name>``.
        dataset: a built-in name or ``pkg.module:factory``.
        data_root: the dataset's folder, or a packed dataset (folder or ``s3://``).
        train_size: keep only that many training samples (None: all; synthetic data: its
            size).
        epochs: the run's length; ``override`` rescales the epoch-based schedule with it.
        global_batch: B, samples per optimizer step over all workers; each of W workers
            takes B / W.
        max_batch_per_worker: the most one worker's forward pass takes; beyond it the worker
            accumulates gradients over micro-batches (None: no limit).
        optimizer: sgd (momentum, nesterov), adam, or adamw (decoupled weight decay, none on
            norms, biases and embeddings).
        lr: the learning rate at global batch ``global_batch``.
        momentum: SGD momentum.
        nesterov: SGD with Nesterov momentum.
        weight_decay: the optimizer's weight decay.
        weight_decay_norm: False: sgd and adam put no weight decay on normalization layers.
        lr_milestones: epochs where a ``step`` schedule multiplies the LR by ``lr_gamma``.
        lr_gamma: the step schedule's factor.
        warmup_epochs: a linear warm-up from 0 first, in either schedule.
        lr_schedule: ``step`` or ``cosine`` (from lr down to ``lr_min`` over the run's global
            steps; ``lr_milestones`` unused).
        lr_min: the cosine schedule's floor.
        grad_clip: clip the gradient to this global L2 norm before each optimizer step (None:
            no clipping), after the all-reduce and fp16 unscaling, inactive weights left out.
        label_smoothing: of the cross-entropy loss.
        precision: fp32, fp16, bf16 autocast (a GradScaler for fp16 only), or auto: bf16
            where the GPU supports it, else fp16 on CUDA, fp32 on the CPU.
        channels_last: conv nets on CUDA in the channels-last memory format.
        compile: run the model through ``torch.compile``.
        sync_bn: SyncBatchNorm across workers (for small per-worker batches).
        sparse_allreduce: with two workers or more, all-reduce only the gradients of active
            weights between mask updates (``distributed.SparseAllReduce``: about density x
            the bytes, bit-identical results; docs/communication.md).
        seed: seeds the weights, the data order and the augmentation.
        granet: the method and its schedule (a ``GraNetConfig``, or a mapping of its fields
            over the demo's).

    Raises:
        ConfigError: a field out of its range, naming the field and the range.
    """

    model: str = "mnist_convnet"
    dataset: str = "mnist5k"
    data_root: str | None = None
    train_size: int | None = None
    epochs: int = 8
    global_batch: int = 128
    max_batch_per_worker: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    weight_decay_norm: bool = True
    lr_milestones: tuple[int, ...] = (6,)
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    lr_schedule: str = "step"
    lr_min: float = 0.0
    grad_clip: float | None = None
    label_smoothing: float = 0.0
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False
    sparse_allreduce: bool = True
    seed: int = 0
    granet: GraNetConfig = field(default_factory=lambda: _DEMO_GRANET)

    def __post_init__(self) -> None:
        if isinstance(self.granet, Mapping):  # GraNet fields over the default GraNet config
            known = (f.name for f in dataclasses.fields(GraNetConfig))
            granet = dataclasses.replace(
                _DEMO_GRANET, **check_mapping(self.granet, known, "granet")
            )
            object.__setattr__(self, "granet", granet)
        check(
            isinstance(self.granet, GraNetConfig),
            "granet",
            self.granet,
            "a GraNetConfig or a mapping of its fields",
        )
        _normalize(self)
        check(is_int(self.epochs) and self.epochs > 0, "epochs", self.epochs, "a positive integer")
        check(
            self.train_size is None or (is_int(self.train_size) and self.train_size > 0),
            "train_size",
            self.train_size,
            "None or a positive integer",
        )
        check(
            is_int(self.global_batch) and self.global_batch > 0,
            "global_batch",
            self.global_batch,
            "a positive integer (samples per step, all workers)",
        )
        check(
            self.max_batch_per_worker is None
            or (is_int(self.max_batch_per_worker) and self.max_batch_per_worker > 0),
            "max_batch_per_worker",
            self.max_batch_per_worker,
            "None or a positive integer",
        )
        check(
            self.optimizer in OPTIMIZERS,
            "optimizer",
            self.optimizer,
            f"one of {', '.join(OPTIMIZERS)}",
        )
        check(
            is_number(self.lr) and self.lr > 0 and math.isfinite(self.lr),
            "lr",
            self.lr,
            "a finite number > 0",
        )
        check(
            is_number(self.momentum) and 0.0 <= self.momentum < 1.0,
            "momentum",
            self.momentum,
            "a number in [0, 1)",
        )
        check(
            is_number(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            self.weight_decay,
            "a number >= 0",
        )
        check(
            is_number(self.lr_gamma) and 0.0 < self.lr_gamma <= 1.0,
            "lr_gamma",
            self.lr_gamma,
            "a number in (0, 1]",
        )
        check(
            all(is_number(m) and 0 < m <= self.epochs for m in self.lr_milestones),
            "lr_milestones",
            self.lr_milestones,
            f"epochs in (0, epochs={self.epochs}]",
        )
        check(
            is_number(self.warmup_epochs) and 0.0 <= self.warmup_epochs < self.epochs,
            "warmup_epochs",
            self.warmup_epochs,
            f"a number in [0, epochs={self.epochs})",
        )
        check(
            self.lr_schedule in LR_SCHEDULES,
            "lr_schedule",
            self.lr_schedule,
            f"one of {', '.join(LR_SCHEDULES)}",
        )
        check(
            is_number(self.lr_min) and 0.0 <= self.lr_min <= self.lr,
            "lr_min",
            self.lr_min,
            f"a number in [0, lr={self.lr}] (the cosine schedule's floor)",
        )
        check(
            self.grad_clip is None or (is_number(self.grad_clip) and self.grad_clip > 0),
            "grad_clip",
            self.grad_clip,
            "None or a global gradient norm > 0",
        )
        check(
            is_number(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0,
            "label_smoothing",
            self.label_smoothing,
            "a number in [0, 1)",
        )
        check(
            self.precision in PRECISIONS,
            "precision",
            self.precision,
            f"one of {', '.join(PRECISIONS)}",
        )
        check_seed("seed", self.seed)
        if self.granet.prunes:
            check(
                self.granet.prune_end <= self.epochs,
                "granet.prune_end",
                self.granet.prune_end,
                f"<= epochs ({self.epochs}) when the method prunes",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for Ray's ``train_loop_config``, checkpoints, preset files)."""
        data = dataclasses.asdict(self)
        data["lr_milestones"] = list(self.lr_milestones)
        data["granet"]["keep_dense"] = list(self.granet.keep_dense)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The config of ``data`` (``to_dict``'s shape): the fields it names, every other one
        (also inside ``granet``) as in ``TrainConfig()``. Sets fields as given: unlike
        ``override``, ``epochs`` and ``global_batch`` rescale nothing here."""
        return _from_dict(cls, data, "train config")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with top-level fields changed; ``granet`` may be a mapping of GraNet fields
        that change this config's GraNet config. Fields are set as given (see ``override``
        for the language that also rescales)."""
        granet = changes.pop("granet", None)
        if isinstance(granet, Mapping):
            check_known(granet, (f.name for f in dataclasses.fields(GraNetConfig)), "granet")
            granet = dataclasses.replace(self.granet, **granet)
        if granet is not None:
            changes["granet"] = granet
        check_known(changes, (f.name for f in dataclasses.fields(self)), "train config")
        return dataclasses.replace(self, **changes)


# ---- presets, rescaling, preset files -------------------------------------------------------


def _cifar(model: str) -> TrainConfig:
    return TrainConfig(
        model=model,
        dataset="cifar10",
        epochs=160,
        global_batch=128,
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
        global_batch=128,
        lr=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=1e-4,
        weight_decay_norm=False,
        lr_milestones=(30, 60, 90),
        warmup_epochs=5,
        label_smoothing=0.1,
        granet=GraNetConfig(
            method="granet",
            init_density=0.5,
            final_density=0.2,
            update_interval=4000,
            prune_start=0,
            prune_end=30,
        ),
    ),
}


def preset(name: str) -> TrainConfig:
    """The paper's settings (docs/algorithm.md section 7) by name.

    Args:
        name: ``cifar10_resnet20``, ``cifar10_vgg19``, ``imagenet_resnet50`` (global batch
            128 = the paper's 2 x 64), or ``mnist_demo`` (the offline demo).

    Returns:
        The preset's ``TrainConfig``.

    Raises:
        ConfigError: an unknown name.
    """
    if name not in PRESETS:
        raise fail("preset", name, f"one of {', '.join(PRESETS)}")
    return PRESETS[name]


def with_epochs(train: TrainConfig, epochs: int) -> TrainConfig:
    """``train`` over ``epochs`` epochs with its epoch-based schedule scaled by
    ``epochs / train.epochs``: pruning window and regrowth end exactly, warm-up exactly,
    LR milestones rounded to whole epochs in [1, epochs] (duplicates merged). A shorter run
    also scales ``update_interval`` (at least 1 step), so the pruning window keeps the
    number of mask updates it had."""
    check(is_int(epochs) and epochs > 0, "epochs", epochs, "a positive integer")
    if epochs == train.epochs:
        return train
    factor = epochs / train.epochs
    g = train.granet
    interval = g.update_interval if factor > 1 else max(1, round(g.update_interval * factor))
    return train.replace(
        epochs=epochs,
        lr_milestones=tuple(
            sorted({min(epochs, max(1, round(m * factor))) for m in train.lr_milestones})
        ),
        warmup_epochs=train.warmup_epochs * factor,
        granet={
            "prune_start": g.prune_start * factor,
            "prune_end": g.prune_end * factor,
            "regrow_end": None if g.regrow_end is None else g.regrow_end * factor,
            "update_interval": interval,
        },
    )


def with_global_batch(train: TrainConfig, global_batch: int) -> TrainConfig:
    """``train`` at another global batch B' (docs/algorithm.md section 5): the LR scaled linearly
    (``lr`` and ``lr_min`` x B' / B, warm-up kept) and ``update_interval`` inversely (x B / B',
    at least 1), so mask updates stay at the same points in epochs."""
    check(
        is_int(global_batch) and global_batch > 0,
        "global_batch",
        global_batch,
        "a positive integer (samples per step, all workers)",
    )
    if global_batch == train.global_batch:
        return train
    factor = global_batch / train.global_batch
    return train.replace(
        global_batch=global_batch,
        lr=train.lr * factor,
        lr_min=train.lr_min * factor,
        granet={"update_interval": max(1, round(train.granet.update_interval / factor))},
    )


def rescale(
    train: TrainConfig, *, epochs: int | None = None, global_batch: int | None = None
) -> TrainConfig:
    """``with_epochs`` then ``with_global_batch``, each where given: the one meaning of
    ``epochs`` and ``global_batch`` on every command line and in every grid file."""
    if epochs is not None:
        train = with_epochs(train, epochs)
    if global_batch is not None:
        train = with_global_batch(train, global_batch)
    return train


# ---- the override language: one way to change a TrainConfig -----------------------------------
#
# Flags, ``--set``, grid files, preset files and Python all express a change to a TrainConfig as
# a mapping of keys to values, applied by ``override``. A key is a field of TrainConfig
# (``lr``) or a dotted path into its GraNet config (``granet.final_density``); GraNet fields
# that TrainConfig does not share may drop the prefix (``final_density``; ``seed`` is
# TrainConfig's, ``granet.seed`` the engine's). A nested ``granet: {...}`` mapping means the
# same as its dotted keys. ``granet.prune_window: [start, end]`` sets both ends of the window.
# ``epochs`` and ``global_batch`` rescale the schedule (``rescale``) before any other key of
# the same change is set, so an explicit ``lr`` or ``update_interval`` always wins.
# Precedence, later wins: the preset (or ``TrainConfig()`` under a preset file), the preset
# file, a grid file's ``train`` keys, a sweep's variant and grid point, then the command
# line's named flags and ``--set`` pairs.

GRANET_PREFIX = "granet."
PAIR_KEYS = {"granet.prune_window": ("granet.prune_start", "granet.prune_end")}
RESCALE_KEYS = ("epochs", "global_batch")


def override_keys() -> list[str]:
    """Every key ``override`` takes, dotted, in field order."""
    train = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "granet"]
    granet = [GRANET_PREFIX + f.name for f in dataclasses.fields(GraNetConfig)]
    return [*train, *granet, *PAIR_KEYS]


def resolve_key(key: Any) -> str:
    """The dotted form of an override key (``final_density`` -> ``granet.final_density``);
    ``ConfigError`` naming the known keys for anything else."""
    known = override_keys()
    if isinstance(key, str):
        if key in known:
            return key
        if GRANET_PREFIX + key in known:
            return GRANET_PREFIX + key
    raise ConfigError(f"unknown train config field(s) {key}; known: {', '.join(known)}")


def flatten(changes: Mapping[str, Any], where: str = "train config") -> dict[str, Any]:
    """``changes`` with dotted keys only: nested ``granet`` mappings (or a ``GraNetConfig``)
    opened, short GraNet keys prefixed. ``where`` names the source in errors."""
    if not isinstance(changes, Mapping):
        raise fail(where, changes, "a mapping of field: value")
    flat: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in changes.items():
        if key == "granet" and isinstance(value, (Mapping, GraNetConfig)):
            inner = dataclasses.asdict(value) if isinstance(value, GraNetConfig) else value
            pairs = [(GRANET_PREFIX + str(name), item) for name, item in inner.items()]
        else:
            pairs = [(key, value)]
        for name, item in pairs:
            try:
                flat[resolve_key(name)] = item
            except ConfigError:
                unknown.append(str(name))
    if unknown:
        known = ", ".join(override_keys())
        raise ConfigError(f"unknown {where} field(s) {', '.join(unknown)}; known: {known}")
    return flat


def override(
    train: TrainConfig, changes: Mapping[str, Any], where: str = "train config"
) -> TrainConfig:
    """``train`` with ``changes`` (override keys, see above) applied: ``epochs`` and
    ``global_batch`` rescale first, then every other key is set as given. Raises
    ``ConfigError`` naming the field (``where`` names the source of an unknown key)."""
    flat = flatten(changes, where)
    train = rescale(
        train, epochs=flat.pop("epochs", None), global_batch=flat.pop("global_batch", None)
    )
    for pair, (first, second) in PAIR_KEYS.items():
        if pair in flat:
            value = flat.pop(pair)
            check(
                isinstance(value, Sequence)
                and not isinstance(value, str)
                and len(value) == 2
                and all(map(is_number, value)),
                pair,
                value,
                "[start, end] in epochs",
            )
            flat[first], flat[second] = value
    top = {k: v for k, v in flat.items() if not k.startswith(GRANET_PREFIX)}
    granet = {k[len(GRANET_PREFIX) :]: v for k, v in flat.items() if k.startswith(GRANET_PREFIX)}
    return train.replace(**top, granet=granet)


def field_kind(key: str) -> str:
    """The annotation of an override key's field, as written (``float``, ``int | None``...);
    ``list`` for a pair key."""
    if key in PAIR_KEYS:
        return "list"
    cls, name = (GraNetConfig, key[len(GRANET_PREFIX) :]) if "." in key else (TrainConfig, key)
    return str(next(f.type for f in dataclasses.fields(cls) if f.name == name))


def parse_value(key: str, text: str) -> Any:
    """A command-line value for override key ``key``, read as its field's type: numbers,
    ``true`` / ``false``, ``none`` / ``null`` where the field allows None, a YAML list
    (``[30, 60]``) for a list field, else the text itself."""
    key = resolve_key(key)
    kind = field_kind(key)
    if "None" in kind and text.strip().lower() in ("none", "null", ""):
        return None
    if kind.startswith("tuple[str") and not text.lstrip().startswith("["):
        return [p.strip() for p in text.split(",") if p.strip()]  # patterns: 'patch.*,head.*'
    try:
        if kind.startswith(("tuple", "list")):
            value = yaml.safe_load(text)
            return value if isinstance(value, list) else [value]
        if kind.startswith("bool"):
            flag = text.strip().lower()
            check(flag in ("true", "false", "1", "0", "yes", "no"), key, text, "true or false")
            return flag in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except (ValueError, yaml.YAMLError):
        raise fail(key, text, f"a value of type {kind}") from None
    return text


def changes(old: TrainConfig, new: TrainConfig) -> list[str]:
    """``field: old -> new`` for every field that differs (GraNet fields as ``granet.x``)."""

    def flat(train: TrainConfig) -> dict[str, Any]:
        data = train.to_dict()
        return {
            **{k: v for k, v in data.items() if k != "granet"},
            **{f"granet.{k}": v for k, v in data["granet"].items()},
        }

    a, b = flat(old), flat(new)
    return [f"{k}: {_short(a[k])} -> {_short(b[k])}" for k in a if a[k] != b[k]]


def _short(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def preset_file_name(final_density: float) -> str:
    """The file name of the best preset for a target density: ``best-density-0.05.json``."""
    return f"best-density-{final_density:g}.json"


def dump_preset(train: TrainConfig) -> bytes:
    """``train`` as an indented JSON preset file."""
    return (json.dumps(train.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def load_preset_file(path: str | Path) -> TrainConfig:
    """The ``TrainConfig`` of a preset file: override keys (JSON or YAML, nested as
    ``to_dict`` writes them or dotted) applied to ``TrainConfig()``, so ``{}`` is
    ``TrainConfig()`` and a file ``dump_preset`` wrote is its config exactly. Raises
    ``ConfigError`` naming the file and the field when it is missing or invalid."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"preset file {path}: cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"preset file {path}: not valid JSON/YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path}: must hold a mapping of TrainConfig fields")
    try:
        return override(TrainConfig(), data)
    except ConfigError as err:
        raise ConfigError(f"preset file {path}: {err}") from None


# ---- where and how a run executes ----------------------------------------------------------

STORAGE_ENV = "GRANET_RAY_STORAGE"
S3_OPTION_KEYS = ("endpoint_url", "key", "secret", "token")
# Run and sweep names: one path component (``fullmatch``: no trailing newline slips through).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A sweep trial's Tune driver holds this many CPUs beside its Train workers (Tune refuses 0);
# a sweep's default ``cpus_per_worker`` is 1 less this, so a trial of one worker fits one CPU.
TRIAL_DRIVER_CPU = 0.01


def default_storage_path() -> str:
    """``$GRANET_RAY_STORAGE`` or ``~/granet-ray/runs``, made absolute when local."""
    path = os.environ.get(STORAGE_ENV) or "~/granet-ray/runs"
    return path if is_s3(path) else os.path.abspath(os.path.expanduser(path))


def is_s3(path: str) -> bool:
    """Whether ``path`` is an ``s3://`` URI."""
    return path.startswith("s3://")


# The metrics ``RunSettings.keep_best`` may name (of ``events.EpochMetrics``), and which way
# is better.
KEEP_BEST_METRICS: dict[str, str] = {
    "val_accuracy": "max",
    "accuracy": "max",
    "train_accuracy": "max",
    "val_loss": "min",
    "train_loss": "min",
}


@dataclass(frozen=True)
class RunSettings:
    """Where and how a run executes (nothing of it changes what the run computes).

    Attributes:
        num_workers: Ray Train workers (one process each); with ``min_workers`` the most of
            an elastic run, which starts once ``min_workers`` are up, goes on smaller when
            nodes are lost and grows back when they return (resuming from its newest
            checkpoint at every resize).
        min_workers: the fewest workers of an elastic run (None: a fixed size).
        resize_interval: seconds between an elastic run's checks for capacity to grow.
        gpus_per_worker: > 0 trains on CUDA with NCCL; 0 on the CPU with gloo.
        cpus_per_worker: CPUs of each worker; also its data-loader processes (this less one).
        storage_path: a local folder (made absolute) or ``s3://bucket/prefix``.
        storage_options: S3 credentials and endpoint (keys ``endpoint_url``, ``key``,
            ``secret``, ``token``).
        name: the run's folder under storage_path (None: a unique generated name; an
            existing name resumes that run).
        checkpoint_every: epochs between checkpoints (one is always written at the end).
        checkpoint_every_steps: also a checkpoint every that many global steps inside an
            epoch (None: only at epoch ends).
        max_failures: worker-group failures to recover from the latest checkpoint (-1: no
            limit).
        keep_checkpoints: keep the newest N committed checkpoints (None: keep all).
        keep_best: also keep the epoch-end checkpoint best by this metric (a key of
            ``KEEP_BEST_METRICS``; needs keep_checkpoints).
        tensorboard: event files in the run's ``tb/`` folder.
        mlflow_uri: also log to this MLflow tracking URI (None: no MLflow).
        mlflow_experiment: the MLflow experiment's name.
        lease_renew_s: seconds between renewals of the run's lease on its folder
            (``store.lease``: it expires after 3 missed renewals).
        data_options: S3 credentials and endpoint of an ``s3://`` ``data_root`` (a packed
            dataset; the keys of storage_options; never written into a checkpoint).
        data_cache_dir: each node's cache of packed-dataset shards (None:
            ``~/.cache/granet-ray/data``).
        data_cache_gb: that cache's bound in GB.

    Raises:
        ConfigError: a field out of its range, naming the field and the range.
    """

    num_workers: int = 1
    min_workers: int | None = None
    resize_interval: float = 60.0
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    storage_path: str = field(default_factory=default_storage_path)
    storage_options: dict[str, Any] | None = None
    name: str | None = None
    checkpoint_every: int = 1
    checkpoint_every_steps: int | None = None
    max_failures: int = 1
    keep_checkpoints: int | None = None
    keep_best: str | None = None
    tensorboard: bool = True
    mlflow_uri: str | None = None
    mlflow_experiment: str = "granet-ray"
    lease_renew_s: float = 30.0
    data_options: dict[str, Any] | None = None
    data_cache_dir: str | None = None
    data_cache_gb: float = 8.0

    def __post_init__(self) -> None:
        _normalize(self)
        check(
            is_int(self.num_workers) and self.num_workers >= 1,
            "num_workers",
            self.num_workers,
            "a positive integer",
        )
        check(
            self.min_workers is None
            or (is_int(self.min_workers) and 1 <= self.min_workers <= self.num_workers),
            "min_workers",
            self.min_workers,
            f"None or an integer in [1, num_workers={self.num_workers}]",
        )
        check(
            is_number(self.resize_interval) and self.resize_interval > 0,
            "resize_interval",
            self.resize_interval,
            "a number of seconds > 0",
        )
        check(
            is_number(self.gpus_per_worker) and self.gpus_per_worker >= 0,
            "gpus_per_worker",
            self.gpus_per_worker,
            "a number >= 0",
        )
        check(
            is_number(self.cpus_per_worker) and self.cpus_per_worker > 0,
            "cpus_per_worker",
            self.cpus_per_worker,
            "a number > 0",
        )
        storage = "a local folder or s3://bucket/prefix"
        check(
            isinstance(self.storage_path, str) and bool(self.storage_path),
            "storage_path",
            self.storage_path,
            storage,
        )
        scheme = urlparse(self.storage_path).scheme
        if is_s3(self.storage_path):
            check(
                bool(urlparse(self.storage_path).netloc),
                "storage_path",
                self.storage_path,
                "s3://bucket[/prefix] with a bucket",
            )
        else:
            check(len(scheme) <= 1, "storage_path", self.storage_path, storage)  # C: is a drive
            path = os.path.abspath(os.path.expanduser(self.storage_path))
            object.__setattr__(self, "storage_path", path)
        if self.storage_options is not None:
            check(
                isinstance(self.storage_options, dict),
                "storage_options",
                self.storage_options,
                "a dict or None",
            )
            unknown = sorted(set(self.storage_options) - set(S3_OPTION_KEYS))
            check(
                not unknown, "storage_options", unknown, f"keys among {', '.join(S3_OPTION_KEYS)}"
            )
            check(
                is_s3(self.storage_path),
                "storage_options",
                "...",
                "None unless storage_path is s3://...",
            )
        check(
            self.name is None
            or (isinstance(self.name, str) and bool(NAME_PATTERN.fullmatch(self.name))),
            "name",
            self.name,
            "None or letters, digits, '_', '.', '-' (no '/')",
        )
        check(
            is_int(self.checkpoint_every) and self.checkpoint_every >= 1,
            "checkpoint_every",
            self.checkpoint_every,
            "a positive integer of epochs",
        )
        check(
            self.checkpoint_every_steps is None
            or (is_int(self.checkpoint_every_steps) and self.checkpoint_every_steps >= 1),
            "checkpoint_every_steps",
            self.checkpoint_every_steps,
            "None or a positive integer of global steps",
        )
        check(
            is_int(self.max_failures) and self.max_failures >= -1,
            "max_failures",
            self.max_failures,
            "an integer >= -1 (-1: no limit)",
        )
        check(
            self.data_options is None
            or (
                isinstance(self.data_options, dict)
                and set(self.data_options) <= set(S3_OPTION_KEYS)
            ),
            "data_options",
            self.data_options,
            f"None or a dict with keys among {', '.join(S3_OPTION_KEYS)}",
        )
        check(
            self.data_cache_dir is None
            or (isinstance(self.data_cache_dir, str) and bool(self.data_cache_dir)),
            "data_cache_dir",
            self.data_cache_dir,
            "None or a local folder",
        )
        check(
            is_number(self.data_cache_gb) and self.data_cache_gb > 0,
            "data_cache_gb",
            self.data_cache_gb,
            "a number of GB > 0",
        )
        check(
            self.keep_checkpoints is None
            or (is_int(self.keep_checkpoints) and self.keep_checkpoints >= 1),
            "keep_checkpoints",
            self.keep_checkpoints,
            "None (keep all) or a positive integer",
        )
        check(
            self.keep_best is None or self.keep_best in KEEP_BEST_METRICS,
            "keep_best",
            self.keep_best,
            f"None or one of {', '.join(KEEP_BEST_METRICS)}",
        )
        check(
            self.keep_best is None or self.keep_checkpoints is not None,
            "keep_best",
            self.keep_best,
            "None unless keep_checkpoints is set (without it every checkpoint is kept)",
        )
        check(isinstance(self.tensorboard, bool), "tensorboard", self.tensorboard, "a bool")
        check(
            self.mlflow_uri is None or (isinstance(self.mlflow_uri, str) and bool(self.mlflow_uri)),
            "mlflow_uri",
            self.mlflow_uri,
            "None or a tracking URI (file:/path, sqlite:///..., http://host:port)",
        )
        check(
            isinstance(self.mlflow_experiment, str) and bool(self.mlflow_experiment.strip()),
            "mlflow_experiment",
            self.mlflow_experiment,
            "a non-empty experiment name",
        )
        check(
            is_number(self.lease_renew_s) and self.lease_renew_s > 0,
            "lease_renew_s",
            self.lease_renew_s,
            "a number of seconds > 0",
        )

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def elastic(self) -> bool:
        """Whether the number of workers may change during the run."""
        return self.min_workers is not None and self.min_workers < self.num_workers

    @property
    def run_uri(self) -> str:
        """The run's folder (checkpoints, history, plot): ``<storage_path>/<name>``."""
        if self.name is None:
            raise ValueError("the run has no name yet")
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunSettings:
        return _from_dict(cls, data, "run setting")

    def replace(self, **changes: Any) -> RunSettings:
        return dataclasses.replace(self, **changes)


def run_name(train: TrainConfig) -> str:
    """A unique run name: ``granet-<model>-<method>-<UTC time>-<4 hex>`` (a model reference's
    last name, ``pkg.nets:small_vit`` -> ``small_vit``, other characters as ``-``)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    model = re.sub(r"[^A-Za-z0-9_.-]", "-", train.model.rpartition(":")[2])
    return f"granet-{model}-{train.granet.method}-{stamp}-{secrets.token_hex(2)}"
