"""One training run, wherever it runs: ``build_run`` assembles it from a ``TrainConfig`` (data,
model, optimizer, LR schedule, GraNet engine, precision, seeding) and ``run_epochs`` trains
it, with small ``Hooks`` for what differs between a process of its own and a Ray Train
worker (progress, reports, checkpoints, the distributed sync). No Ray, no I/O.

Every schedule counts global optimizer steps of ``global_batch`` samples (docs/algorithm.md
section 5): on W workers each step is the same samples, dealt out B / W each (``data.sharding``); a
worker whose share exceeds ``max_batch_per_worker`` accumulates gradients over micro-batches.
Losses are normalized by the step's global size, so the all-reduced gradient is the mean
over the step's samples at any W. Between mask updates the loop never waits for the device:
losses and correct counts accumulate there and are read at epoch ends (and when a progress
hook asks).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from granet_ray.config import ConfigError, TrainConfig
from granet_ray.data import DataBundle, StreamOptions, build_datasets
from granet_ray.data.sharding import (
    MicroBatchSampler,
    StepShare,
    epoch_shares,
    smallest_step,
    steps_per_epoch,
)
from granet_ray.distributed import SparseAllReduce, register_sparse_allreduce, sum_across_workers
from granet_ray.events import EpochEnded, EpochMetrics, Event, Started, Stepped
from granet_ray.models import build_model
from granet_ray.sample_seeds import EpochSampler, SampleSeeded
from granet_ray.sparsity import GraNet, MaskSync, unwrap

_NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


# ---- seeding, precision, optimizer, LR ------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python ``random`` and NumPy with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_seed(seed: int, rank: int, step: int = 0) -> int:
    """A seed for worker ``rank``'s own random draws (data augmentation, data-loader
    processes) from global step ``step`` on, distinct per rank. Mask decisions never use it:
    the engine draws from generators seeded by (run seed, update, layer) alone."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32``, ``fp16`` or ``bf16``: ``auto`` is bf16 on a GPU that supports it, fp16 on
    other GPUs, fp32 on the CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def no_decay_parameters(model: nn.Module) -> set[int]:
    """The ``id``s of the parameters AdamW leaves undecayed: biases and every other parameter
    of fewer than 2 dimensions, those of normalization layers and ``nn.Embedding``, and the
    ones the model names in its own ``no_weight_decay()`` (timm's convention, e.g. position
    embeddings and class tokens)."""
    skip = {id(p) for p in model.parameters() if p.dim() < 2}
    for module in model.modules():
        if isinstance(module, (*_NORM_LAYERS, nn.Embedding, nn.EmbeddingBag)):
            skip.update(id(p) for p in module.parameters(recurse=False))
    named = getattr(model, "no_weight_decay", None)
    if callable(named):
        keys = set(named())
        for name, param in model.named_parameters():
            if name in keys or name.split(".")[0] in keys:
                skip.add(id(param))
    return skip


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum), Adam or AdamW. With ``weight_decay_norm=False`` the
    parameters of normalization layers (BatchNorm, GroupNorm, LayerNorm, ...) get no weight
    decay under SGD and Adam; AdamW's decoupled decay never touches norms, biases and
    embeddings (``no_decay_parameters``). On CUDA the fused implementation: one kernel per
    step, and a GradScaler hands it the overflow flag on the device instead of reading it
    every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused: dict[str, Any] = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    if cfg.optimizer == "adamw":
        skip = no_decay_parameters(model)
        groups_w: list[dict[str, Any]] = [
            {"params": [p for p in params if id(p) not in skip]},
            {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups_w, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
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
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.SGD(
        groups,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
        **fused,
    )


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """LR multiplier before global optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_epochs``, then for ``lr_schedule="step"`` x ``lr_gamma`` at each epoch of
    ``lr_milestones``, for ``"cosine"`` a half cosine from 1 down to ``lr_min / lr`` at the
    run's last step (``epochs * steps_per_epoch`` global steps in all)."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return min(1.0, (step + 1) / warmup)
    if cfg.lr_schedule == "cosine":
        floor = cfg.lr_min / cfg.lr
        last = cfg.epochs * steps_per_epoch - 1  # the last step's index
        start = math.ceil(warmup)
        progress = min(1.0, (step - start) / max(1, last - start))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    milestones = sorted(m * steps_per_epoch for m in cfg.lr_milestones)
    return cfg.lr_gamma ** bisect.bisect_right(milestones, step)


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step schedule (call ``scheduler.step()`` after every step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch)
    )


# ---- the plan: steps of the global batch ------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The step schedule of a run: ``steps_per_epoch`` global steps of ``global_batch`` of
    ``train_size`` samples, ``total_steps`` in all. The same at any number of workers."""

    train_size: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int


def plan_run(train: TrainConfig, train_size: int, num_workers: int) -> Plan:
    """The plan of ``train`` on a training set of ``train_size`` samples; ``ConfigError``
    when some step would leave one of ``num_workers`` workers without a sample."""
    smallest = smallest_step(train_size, train.global_batch)
    if smallest < num_workers:
        raise ConfigError(
            f"global_batch={train.global_batch} is invalid: every one of the {num_workers} "
            f"workers needs a sample of every step, and the smallest step of the "
            f"{train_size} training samples holds {smallest}"
        )
    spe = steps_per_epoch(train_size, train.global_batch)
    return Plan(train_size, train.global_batch, spe, spe * train.epochs)


# ---- building a run -------------------------------------------------------------------------


def load_data(train: TrainConfig, stream: StreamOptions | None = None) -> DataBundle:
    """The datasets of ``train`` (a packed ``data_root`` read as ``stream`` says); a missing
    or unreadable dataset raises ``ConfigError`` with the data builder's message (which names
    the field)."""
    try:
        return build_datasets(
            train.dataset,
            train.data_root,
            train_size=train.train_size,
            seed=train.seed,
            stream=stream,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise ConfigError(str(err)) from None


def check_model_input(model: nn.Module, data: DataBundle, train: TrainConfig) -> None:
    """``ConfigError`` unless ``model`` (on the CPU, just built) takes two of the dataset's
    test inputs and returns one score per class for each: a model and dataset that do not
    fit fail here, naming both, instead of in the first training step. The model stays in
    its mode; no gradient, no state changes."""
    count = min(2, len(data.test))  # type: ignore[arg-type]
    inputs = torch.stack([data.test[i][0] for i in range(count)])
    mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(inputs)
    except Exception as err:
        text = str(err).strip().splitlines()
        raise ConfigError(
            f"model={train.model!r} does not accept dataset={train.dataset!r} inputs of shape "
            f"{tuple(data.input_shape)}: {type(err).__name__}: {text[0] if text else ''}"
        ) from None
    finally:
        model.train(mode)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
    if shape != (count, data.num_classes):
        got = type(output).__name__ if shape is None else f"shape {list(shape)}"
        raise ConfigError(
            f"model={train.model!r} is invalid: it returns {got} for a batch of {count} "
            f"dataset={train.dataset!r} inputs; training needs one score per class: "
            f"[{count}, {data.num_classes}]"
        )


Wrap = Callable[[nn.Module], nn.Module]


@dataclass
class Run:
    """Everything one process trains with. ``model`` is what the loop calls (maybe DDP- or
    compile-wrapped); ``net`` the plain module (its state-dict names are the checkpoint's).
    ``rank`` of ``world`` workers; ``precision`` resolved; ``scaler`` only for fp16;
    ``channels_last``: model and 4-d inputs in the channels-last memory format;
    ``allreduce``: the sparse gradient all-reduce of a DDP model (``train.sparse_allreduce``);
    ``resizes``: the elastic restarts on another number of workers so far."""

    train: TrainConfig
    plan: Plan
    data: DataBundle
    device: torch.device
    rank: int
    world: int
    precision: str
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: GraNet
    scaler: torch.amp.GradScaler | None
    sampler: MicroBatchSampler
    train_loader: DataLoader
    test_loader: DataLoader
    channels_last: bool = False
    allreduce: SparseAllReduce | None = None
    resizes: list[dict[str, Any]] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        """The optimizer-independent states a checkpoint carries besides weights and masks:
        engine (without masks), LR scheduler, GradScaler."""
        engine = {k: v for k, v in self.engine.state_dict().items() if k != "masks"}
        return {
            "engine": engine,
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
        }


def has_conv(model: nn.Module) -> bool:
    """Whether the model has a 2-d convolution (channels-last helps those only)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def loader_options(device: torch.device, loader_workers: int) -> dict[str, Any]:
    """DataLoader options: pinned memory on CUDA only (for non-blocking copies); with
    ``loader_workers`` > 0 processes the workers live across epochs and prefetch 4 batches
    each."""
    options: dict[str, Any] = {"num_workers": loader_workers, "pin_memory": device.type == "cuda"}
    if loader_workers:
        options.update(persistent_workers=True, prefetch_factor=4)
    return options


def build_run(
    train: TrainConfig,
    *,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    wrap: Wrap | None = None,
    sync: MaskSync | None = None,
    loader_workers: int = 0,
    data: DataBundle | None = None,
    stream: StreamOptions | None = None,
    channels_last: bool | None = None,
) -> Run:
    """Assemble ``train`` for worker ``rank`` of ``world`` on ``device``.

    wrap: turns the model (on its device) into what the loop calls, e.g. DDP
    (``ray.train.torch.prepare_model``). sync: the engine's cross-worker agreement.
    loader_workers: data-loader processes. data: the datasets, when already built.
    stream: how a packed ``data_root`` is read (S3 options, shard cache).
    channels_last: the memory format of a conv net and its inputs (None: channels-last on
    CUDA when ``train.channels_last``; True also on the CPU, e.g. to test that path).
    Seeds every RNG with ``train.seed`` first, so every worker starts from the same weights
    and masks; afterwards each worker's RNGs follow ``worker_seed``.
    """
    seed_everything(train.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if data is None:
        data = load_data(train, stream)
    plan = plan_run(train, len(data.train), world)  # type: ignore[arg-type]
    net = build_model(train.model, num_classes=data.num_classes)
    check_model_input(net, data, train)
    if train.sync_bn and world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device)
    if channels_last is None:
        channels_last = train.channels_last and device.type == "cuda"
    channels_last = channels_last and has_conv(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = wrap(net) if wrap is not None else net
    net = unwrap(model)
    if train.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(net, train)
    engine = GraNet(
        model,
        optimizer,
        train.granet,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        sync=sync,
    )
    if train.compile:  # FLOPs by one eager forward, so the compiled graph holds no hook
        engine.measure_flops(data.test[0][0].unsqueeze(0).to(device))
    # Only where it can save something: a group of several training processes (a one-process
    # DDP group, e.g. to measure the hook, registers it with register_sparse_allreduce).
    allreduce = (
        register_sparse_allreduce(model, engine) if train.sparse_allreduce and world > 1 else None
    )
    precision = resolve_precision(train.precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    sampler = EpochSampler() if loader_workers else MicroBatchSampler()
    options = loader_options(device, loader_workers)
    train_set = SampleSeeded(data.train, train.seed) if loader_workers else data.train
    if loader_workers:  # loader processes draw their seeds from their own generator
        options["generator"] = torch.Generator().manual_seed(worker_seed(train.seed, rank))
    train_loader = DataLoader(train_set, batch_sampler=sampler, **options)
    shard = Subset(data.test, range(rank, len(data.test), world))  # type: ignore[arg-type]
    test_loader = DataLoader(shard, batch_size=max(1, plan.global_batch // world), **options)
    seed_everything(worker_seed(train.seed, rank))  # the same weights, own augmentation
    return Run(
        train=train,
        plan=plan,
        data=data,
        device=device,
        rank=rank,
        world=world,
        precision=precision,
        model=model,
        net=net,
        optimizer=optimizer,
        scheduler=build_lr_schedule(optimizer, train, plan.steps_per_epoch),
        engine=engine,
        scaler=scaler,
        sampler=sampler,
        train_loader=train_loader,
        test_loader=test_loader,
        channels_last=channels_last,
        allreduce=allreduce,
    )


# ---- training and evaluation ------------------------------------------------------------------


@dataclass
class Sums:
    """Loss, correct and sample sums of an epoch so far, on the device (no host sync until
    ``read``); add them across workers before dividing."""

    loss: torch.Tensor
    correct: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, device: torch.device) -> Sums:
        loss = torch.zeros((), dtype=torch.float64, device=device)
        return cls(loss, torch.zeros((), dtype=torch.int64, device=device))

    def read(self) -> Totals:
        """This worker's sums as plain numbers (one host sync)."""
        return Totals(float(self.loss), int(self.correct), self.count)


@dataclass(frozen=True)
class Totals:
    """Loss, correct and sample sums as numbers; ``loss`` and ``accuracy`` are the means."""

    loss_sum: float
    correct: int
    count: int

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)

    def across_workers(self) -> Totals:
        """These sums added over every worker (one all-reduce; itself in one process)."""
        loss, correct, count = sum_across_workers([self.loss_sum, self.correct, self.count])
        return Totals(loss, round(correct), round(count))


@dataclass(frozen=True)
class StepInfo:
    """What one global optimizer step produced. ``step`` is the global step (1-based),
    ``epoch`` 0-based, ``share`` this worker's samples of it, ``loss`` the step's mean loss
    on this worker as a device tensor (reading it syncs), ``update`` the mask update's
    statistics or None."""

    step: int
    epoch: int
    share: StepShare
    loss: torch.Tensor
    update: dict[str, Any] | None


@torch.no_grad()
def clip_gradients(optimizer: torch.optim.Optimizer, engine: GraNet, max_norm: float) -> None:
    """Scale every gradient the optimizer holds by ``min(1, max_norm / norm)``, where ``norm``
    is the global L2 norm of the gradient that trains: a prunable weight's gradient counts at
    its active positions only (inactive weights are masked after the step; their gradients
    only rank regrowth, and the sparse all-reduce does not send them). So the norm is the
    same with or without the sparse all-reduce, on every worker, and scaling keeps the
    regrowth ranking. Runs after the all-reduce (and after fp16 unscaling); no host sync."""
    masks = {id(p): engine.masks[n] for n, p in engine.params.items()}
    grads = [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]
    if not grads:
        return
    counted = [
        g * masks[id(p)] if id(p) in masks else g
        for group in optimizer.param_groups
        for p in group["params"]
        if (g := p.grad) is not None
    ]
    norms = torch._foreach_norm(counted)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, scale)


def _no_sync(model: nn.Module) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` (gradients accumulate locally), or nothing for a plain model."""
    inner = getattr(model, "_orig_mod", model)
    return inner.no_sync() if hasattr(inner, "no_sync") else contextlib.nullcontext()


def dataset_order(dataset: Any, seed: int, epoch: int) -> dict[str, np.ndarray]:
    """``epoch_shares``' ``order`` and ``keys`` for a dataset with an order of its own (a
    packed dataset: its block shuffle, and the shard of each sample, so that each worker
    reads few shards); none for others (``sharding.epoch_order``)."""
    order = getattr(dataset, "epoch_order", None)
    if order is None:
        return {}
    return {"order": order(seed, epoch), "keys": dataset.sample_shards}


def train_steps(run: Run, epoch: int, sums: Sums, *, start_step: int = 0) -> Iterator[StepInfo]:
    """Train epoch ``epoch`` (0-based) from its step ``start_step`` on, yielding after every
    global step: forward and backward of each micro-batch (loss sum x world / step size, so
    DDP's mean is the step's mean), the optimizer step (GradScaler for fp16: gradients are
    unscaled first, so the engine reads true ones), the LR step, then ``engine.step()``."""
    model, device = run.model, run.device
    model.train()
    loss_fn = nn.CrossEntropyLoss(reduction="sum", label_smoothing=run.train.label_smoothing)
    shares = epoch_shares(
        run.plan.train_size,
        run.plan.global_batch,
        seed=run.train.seed,
        epoch=epoch,
        rank=run.rank,
        world=run.world,
        max_batch=run.train.max_batch_per_worker,
        start_step=start_step,
        **dataset_order(run.data.train, run.train.seed, epoch),
    )
    run.sampler.shares = shares
    if isinstance(run.sampler, EpochSampler):
        run.sampler.epoch = epoch
    follow = getattr(run.data.train, "follow", None)  # a streamed dataset prefetches
    if follow is not None:
        follow(shares)
    batches = iter(run.train_loader)
    for share in shares:
        run.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for i, _ in enumerate(share.micro):
            inputs, targets = next(batches)
            inputs = inputs.to(device, non_blocking=True)
            if run.channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            last = i == len(share.micro) - 1
            with contextlib.nullcontext() if last else _no_sync(model):
                with autocast(device, run.precision):
                    logits = model(inputs)
                    loss = loss_fn(logits.float(), targets)
                scaled = loss * (run.world / share.size)
                (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
            step_loss += loss.detach()
            sums.correct += (logits.argmax(dim=1) == targets).sum()
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        if run.train.grad_clip is not None:
            clip_gradients(run.optimizer, run.engine, run.train.grad_clip)
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.scheduler.step()
        update = run.engine.step()
        sums.loss += step_loss
        sums.count += len(share.indices)
        mean = step_loss / len(share.indices)
        yield StepInfo(run.engine.step_count, epoch, share, mean, update)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
) -> Totals:
    """Cross-entropy and top-1 sums of ``model`` over ``loader`` (this process only)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    sums = Sums.zeros(device)
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(inputs)
        sums.loss += loss_fn(logits.float(), targets)
        sums.correct += (logits.argmax(dim=1) == targets).sum()
        sums.count += len(targets)
    return sums.read()


def evaluate(run: Run) -> Totals:
    """Cross-entropy and top-1 sums over this worker's shard of the test set (samples rank,
    rank + world, ...: each on exactly one worker), added over every worker."""
    return evaluate_model(
        run.model,
        run.test_loader,
        device=run.device,
        precision=run.precision,
        channels_last=run.channels_last,
    ).across_workers()


# ---- the epoch loop with hooks -----------------------------------------------------------------


@dataclass
class Position:
    """Where a run stands: ``epoch`` (0-based) in progress after ``step_in_epoch`` of its
    steps, with the training ``totals`` of those steps (all workers) and the metrics of the
    completed epochs."""

    epoch: int = 0
    step_in_epoch: int = 0
    totals: Totals = field(default_factory=lambda: Totals(0.0, 0, 0))
    epochs: list[EpochMetrics] = field(default_factory=list)


class Hooks:
    """What a runner adds to ``run_epochs``; every method is optional."""

    def on_step(self, run: Run, info: StepInfo) -> None:
        """After every global step."""

    def on_checkpoint(self, run: Run, position: Position) -> None:
        """Mid-epoch, every ``checkpoint_every_steps`` global steps (all workers call it)."""

    def on_epoch(
        self, run: Run, metrics: EpochMetrics, position: Position, checkpoint: bool
    ) -> None:
        """After every epoch's evaluation (all workers call it); ``checkpoint``: one is due."""


class HookChain(Hooks):
    """Several hooks called in order."""

    def __init__(self, hooks: list[Hooks]) -> None:
        self.hooks = hooks

    def on_step(self, run: Run, info: StepInfo) -> None:
        for hook in self.hooks:
            hook.on_step(run, info)

    def on_checkpoint(self, run: Run, position: Position) -> None:
        for hook in self.hooks:
            hook.on_checkpoint(run, position)

    def on_epoch(
        self, run: Run, metrics: EpochMetrics, position: Position, checkpoint: bool
    ) -> None:
        for hook in self.hooks:
            hook.on_epoch(run, metrics, position, checkpoint)


def start_event(run: Run, position: Position, checkpoint: str | None) -> Started:
    """The progress event of a run (re)starting at ``position`` (from ``checkpoint``)."""
    return Started(
        epoch=position.epoch,
        epochs=run.train.epochs,
        step=run.engine.step_count,
        steps_per_epoch=run.plan.steps_per_epoch,
        total_steps=run.plan.total_steps,
        global_batch=run.plan.global_batch,
        world_size=run.world,
        checkpoint=checkpoint,
    )


class ProgressHooks(Hooks):
    """Sends ``Stepped`` events (at most one per ``interval`` seconds, always at a mask
    update and an epoch's last step: reading the loss off the device is a host sync) and
    ``EpochEnded`` events to ``send``."""

    def __init__(self, send: Callable[[Event], None], interval: float = 0.5) -> None:
        self.send = send
        self.interval = interval
        self._last = -interval

    def on_step(self, run: Run, info: StepInfo) -> None:
        last = info.share.step + 1 == run.plan.steps_per_epoch
        now = time.monotonic()
        if info.update is None and not last and now - self._last < self.interval:
            return
        self._last = now
        self.send(
            Stepped(
                epoch=info.epoch + 1,
                step=info.step,
                loss=float(info.loss),
                density=run.engine.density(),
                next_update=run.engine.next_update_step(),
            )
        )

    def on_epoch(
        self, run: Run, metrics: EpochMetrics, position: Position, checkpoint: bool
    ) -> None:
        self.send(EpochEnded(metrics))


def epoch_metrics(
    run: Run, epoch: int, fit: Totals, val: Totals, samples_per_second: float
) -> EpochMetrics:
    """What every epoch reports (``fit`` and ``val`` summed over all workers; ``epoch``
    1-based, counting completed epochs)."""
    engine = run.engine
    next_update = engine.next_update_step()
    return {  # the names of EpochMetrics (granet_ray.events), in its order
        "epoch": epoch,
        "step": engine.step_count,
        "train_loss": fit.loss,
        "train_accuracy": fit.accuracy,
        "val_loss": val.loss,
        "val_accuracy": val.accuracy,
        "accuracy": val.accuracy,
        "density": engine.density(),
        "inference_flops": engine.inference_flops(),
        "training_flops": engine.training_flops(),
        "next_update": -1 if next_update is None else next_update,
        "mask_updates": len(engine.history),
        "samples_per_second": samples_per_second,
        "world_size": run.world,
    }


def run_epochs(
    run: Run,
    hooks: Hooks,
    *,
    start: Position | None = None,
    checkpoint_every: int = 1,
    checkpoint_every_steps: int | None = None,
    clock: Callable[[], float] | None = None,
) -> Position:
    """Train from ``start`` (default: the beginning) to the last epoch, calling ``hooks``.
    A checkpoint is due after every ``checkpoint_every`` epochs and the last one, and
    mid-epoch every ``checkpoint_every_steps`` global steps. Returns the final position."""
    clock = clock or time.perf_counter
    position = start or Position()
    spe = run.plan.steps_per_epoch
    for epoch in range(position.epoch, run.train.epochs):
        first = position.step_in_epoch if epoch == position.epoch else 0
        before = position.totals if epoch == position.epoch else Totals(0.0, 0, 0)
        sums = Sums.zeros(run.device)
        began = clock()
        for info in train_steps(run, epoch, sums, start_step=first):
            hooks.on_step(run, info)
            done = info.share.step + 1
            every = checkpoint_every_steps
            if every and done < spe and info.step % every == 0:
                totals = _add(before, sums.read().across_workers())
                hooks.on_checkpoint(run, Position(epoch, done, totals, position.epochs))
        seconds = clock() - began
        now = sums.read().across_workers()
        _check_finite(run, now, epoch)  # on the sum: every worker raises, none waits
        speed = now.count / max(seconds, 1e-9)
        metrics = epoch_metrics(run, epoch + 1, _add(before, now), evaluate(run), speed)
        position = Position(epoch + 1, 0, Totals(0.0, 0, 0), [*position.epochs, metrics])
        due = (epoch + 1) % checkpoint_every == 0 or epoch + 1 == run.train.epochs
        hooks.on_epoch(run, metrics, position, due)
    return position


def _add(a: Totals, b: Totals) -> Totals:
    return Totals(a.loss_sum + b.loss_sum, a.correct + b.correct, a.count + b.count)


def _check_finite(run: Run, fit: Totals, epoch: int) -> None:
    """A non-finite training loss without a GradScaler (which skips such steps) means the
    run diverged: stop with a clear error instead of training on NaN."""
    if run.scaler is None and not np.isfinite(fit.loss_sum):
        raise FloatingPointError(
            f"the training loss of epoch {epoch + 1} is {fit.loss_sum}: the run diverged "
            f"(lr={run.train.lr}); lower --lr or use --precision fp32"
        )
