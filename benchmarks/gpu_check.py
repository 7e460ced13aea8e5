"""The GPU check: one command on one CUDA GPU that proves the GPU training path (docs/gpu.md).

    python benchmarks/gpu_check.py --json gpu_check.json

Four phases, each in a subprocess of its own with its own time limit; the JSON is rewritten
after every phase (and a phase writes its figures as it goes), so a kill leaves every figure
measured so far:

1. ``tests``: ``pytest -m gpu tests/test_gpu.py`` (CUDA masks equal CPU masks, fp16 overflow,
   no host sync between updates, NCCL with a timeout, torch.compile).
2. ``compile``: ResNet-20 through the recipe with ``compile=True`` across mask updates, with
   ``TORCH_LOGS=graph_breaks``: graph breaks (none expected), graphs, compile and step time.
3. ``benchmark``: ResNet-50 on GPU-resident synthetic ImageNet batches, bf16, channels-last:
   dense, GraNet, dense again (their drift reported); images/s, mask update time, peak
   memory; apart from that the data loader's own rate and a loader-fed dense run.
4. ``production``: one-process NCCL DDP ResNet-50 in bf16 across a mask update, with and
   without the sparse all-reduce hook: bytes ratio, step times, the first step after the
   update, host syncs under ``torch.cuda.set_sync_debug_mode``.

Needs no Ray, s3fs or mlxtend and no installed package: the repository goes on the path here.
Without CUDA it says so and exits 0; ``--smoke`` runs every phase on the CPU at toy sizes (the
harness only, its figures mean nothing). Exit status 1 when a phase fails or runs out of time
or a goal is missed.
"""

# ruff: noqa: E402  (the repository goes on sys.path before granet_ray is imported)

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
import contextlib
import gc
import importlib.util
import itertools
import json
import os
import signal
import statistics
import subprocess
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from granet_ray.config import GraNetConfig, TrainConfig, preset
from granet_ray.data import DataBundle, build_datasets
from granet_ray.distributed import DistributedSync, register_sparse_allreduce
from granet_ray.recipe import Sums, build_run, loader_options, train_steps

PHASES = ("tests", "compile", "benchmark", "production")
# each phase's own time limit, seconds (the whole check's --time-limit caps them too)
LIMITS = {"tests": 170.0, "compile": 120.0, "benchmark": 150.0, "production": 90.0}
# figure -> (comparison, bound)
GOALS: dict[str, tuple[str, float]] = {
    "throughput_ratio": (">=", 0.98),
    "update_per_step": ("<=", 2.0),
    "memory_ratio": ("<=", 1.05),
    "graph_breaks": ("<=", 0),
    "steady_step_host_syncs": ("<=", 0),
}
DRIFT_LIMIT = 0.01  # dense rate drift between the two dense runs that is flagged
LOADER_MARGIN = 1.3  # the loader should deliver this much more than the dense GPU rate


class OutOfTime(BaseException):
    """A phase ran past its time limit (a BaseException: no ``except Exception`` swallows it)."""


def _out_of_time(signum: int, frame: Any) -> None:
    raise OutOfTime


# ---- sizes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Models and step counts of the phases: the real ones, or toy ones for ``--smoke``."""

    model: str
    dataset: str
    batch: int
    steps: int
    warmup: int
    update_interval: int
    loader_steps: int
    compile_model: str
    compile_dataset: str
    compile_batch: int
    compile_steps: int
    compile_interval: int
    compile_backend: str
    production_batch: int
    production_steps: int
    production_interval: int


GPU_SIZES = Sizes(
    model="resnet50",
    dataset="synthetic_imagenet",
    batch=256,
    steps=200,
    warmup=20,
    update_interval=50,
    loader_steps=30,
    compile_model="resnet20",
    compile_dataset="synthetic_cifar10",
    compile_batch=128,
    compile_steps=9,
    compile_interval=3,
    compile_backend="inductor",
    production_batch=256,
    production_steps=25,
    production_interval=12,
)
SMOKE_SIZES = Sizes(
    model="mnist_convnet",
    dataset="synthetic_mnist5k",
    batch=8,
    steps=6,
    warmup=2,
    update_interval=2,
    loader_steps=3,
    compile_model="mnist_convnet",
    compile_dataset="synthetic_mnist5k",
    compile_batch=8,
    compile_steps=4,
    compile_interval=2,
    compile_backend="eager",
    production_batch=8,
    production_steps=7,
    production_interval=3,
)


# ---- a phase's figures ------------------------------------------------------------------------


class Part:
    """A phase's record, rewritten to ``path`` at every ``save`` (atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.record: dict[str, Any] = {}

    def save(self, **values: Any) -> None:
        self.record.update(values)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def _device(smoke: bool) -> torch.device:
    if smoke:
        return torch.device("cpu")
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Marks:
    """Points on the device's timeline: CUDA events on a GPU (read after one synchronize), the
    host clock on the CPU (where the work is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.points: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Each point's time since the first, seconds."""
        if self.cuda:
            torch.cuda.synchronize()
            return [self.points[0].elapsed_time(p) / 1000 for p in self.points]
        return [p - self.points[0] for p in self.points]


# ---- runs through the recipe ------------------------------------------------------------------


class Cycled(Dataset):
    """``size`` samples cycling through the first ``pool`` samples of ``base``, held in memory:
    the data loader only copies."""

    def __init__(self, base: Dataset, size: int, pool: int) -> None:
        self.size = size
        self.samples = [base[i] for i in range(pool)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.samples[index % len(self.samples)]


def run_configs(
    *,
    model: str,
    dataset: str,
    batch: int,
    steps: int,
    update_interval: int,
    **changes: Any,
) -> dict[str, TrainConfig]:
    """The dense and the GraNet ``TrainConfig``: the ImageNet ResNet-50 preset with ``model``
    and ``dataset``, one epoch of ``steps`` steps of ``batch``, bf16, channels-last. Dense is
    ``method=static`` at ``final_density=1.0`` (all-ones masks, never masked: plain
    training); GraNet prunes from 0.5 to 0.2 over the epoch with a mask update (global prune
    and regrowth) every ``update_interval`` steps."""
    common: dict[str, Any] = {
        "model": model,
        "dataset": dataset,
        "train_size": batch * steps,
        "epochs": 1,
        "global_batch": batch,
        "lr_milestones": (),
        "warmup_epochs": 0.0,
        "precision": "bf16",
        "channels_last": True,
        **changes,
    }
    granet = GraNetConfig(
        method="granet",
        init_density=0.5,
        final_density=0.2,
        update_interval=update_interval,
        prune_start=0,
        prune_end=1,
    )
    dense = GraNetConfig(method="static", final_density=1.0)
    imagenet = preset("imagenet_resnet50")
    return {
        "dense": imagenet.replace(**common, granet=dense),
        "granet": imagenet.replace(**common, granet=granet),
    }


def cycled_data(train: TrainConfig) -> DataBundle:
    """``train``'s dataset, its training split cycling through ``global_batch`` samples."""
    base = build_datasets(train.dataset, train_size=train.global_batch, seed=train.seed)
    return DataBundle(
        train=Cycled(base.train, train.train_size or train.global_batch, pool=train.global_batch),
        test=base.test,
        num_classes=base.num_classes,
        input_shape=base.input_shape,
    )


def resident_batch(
    data: DataBundle, batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch`` training samples as one batch on ``device`` (inputs channels-last):
    fed to every step, no data loader involved."""
    samples = [data.train[i] for i in range(batch)]
    inputs = torch.stack([x for x, _ in samples]).to(device)
    targets = torch.tensor([int(y) for _, y in samples], device=device)
    return inputs.contiguous(memory_format=torch.channels_last), targets


@dataclass
class Measurement:
    """One run of ``steps`` steps of ``batch`` samples. step_seconds: each timed step (after
    the warm-up, keyed by its 1-based number), from the end of the previous step's
    ``engine.step()`` to the end of its own; engine_seconds: ``engine.step()`` alone at each
    timed mask update; updates: the steps that updated masks; peak_bytes: peak GPU memory
    (None on the CPU); loss: mean training loss; density: at the end; bytes_sent /
    bytes_dense: per step, those of the sparse all-reduce hook (empty without one);
    host_syncs: per watched step, the synchronizing CUDA calls counted."""

    name: str
    batch: int
    steps: int
    step_seconds: dict[int, float]
    engine_seconds: dict[int, float]
    updates: list[int]
    peak_bytes: int | None
    loss: float
    density: float
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_dense: dict[int, int] = field(default_factory=dict)
    host_syncs: dict[int, int] = field(default_factory=dict)

    def images_per_second(self, steps: list[int] | None = None) -> float:
        steps = list(self.step_seconds) if steps is None else steps
        return self.batch * len(steps) / sum(self.step_seconds[s] for s in steps)


@contextlib.contextmanager
def counting_host_syncs(device: torch.device, counts: list[int]) -> Iterator[None]:
    """Appends to ``counts`` how many synchronizing CUDA calls the block made (CUDA's sync
    debug mode set to warn, its warnings counted); nothing is counted on the CPU."""
    if device.type != "cuda":
        yield
        counts.append(0)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
    counts.append(sum("synchroniz" in str(w.message) for w in caught))


def measure(
    name: str,
    train: TrainConfig,
    data: DataBundle,
    device: torch.device,
    *,
    warmup: int,
    loader_workers: int = 0,
    resident: tuple[torch.Tensor, torch.Tensor] | None = None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    sync: DistributedSync | None = None,
    watch: tuple[int, ...] = (),
) -> Measurement:
    """Train one epoch of ``train`` through the recipe, timing every step after the first
    ``warmup`` (>= 1) and ``engine.step()`` at every mask update. ``resident``: a batch on
    the device fed to every step instead of the data loader. ``wrap`` / ``sync``: DDP and its
    mask sync. ``watch``: steps whose host syncs are counted."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = build_run(
        train, device=device, data=data, loader_workers=loader_workers, wrap=wrap, sync=sync
    )
    if train.sparse_allreduce and wrap is not None:  # one process: the recipe leaves it out
        run.allreduce = register_sparse_allreduce(run.model, run.engine)
    if resident is not None:
        run.train_loader = itertools.repeat(resident)  # type: ignore[assignment]
    marks = Marks(device)
    engine, allreduce = run.engine, run.allreduce
    engine_step = engine.step
    sent: dict[int, int] = {}
    dense: dict[int, int] = {}

    def timed_engine_step() -> dict[str, Any] | None:
        marks.mark()
        stats = engine_step()
        marks.mark()
        if allreduce is not None:
            sent[engine.step_count] = allreduce.bytes_sent
            dense[engine.step_count] = allreduce.bytes_dense
        return stats

    engine.step = timed_engine_step  # type: ignore[method-assign]
    sums = Sums.zeros(device)
    updates: list[int] = []
    syncs: dict[int, int] = {}
    steps = train_steps(run, 0, sums)
    while True:
        step = engine.step_count + 1
        counts: list[int] = []
        with counting_host_syncs(device, counts) if step in watch else contextlib.nullcontext():
            info = next(steps, None)
        if info is None:
            break
        if counts:
            syncs[step] = counts[0]
        if info.update is not None:
            updates.append(info.step)
    points = marks.seconds()
    begins, ends = points[0::2], points[1::2]  # index i: step i + 1
    count = len(ends)
    result = Measurement(
        name=name,
        batch=train.global_batch,
        steps=count,
        step_seconds={s: ends[s - 1] - ends[s - 2] for s in range(warmup + 1, count + 1)},
        engine_seconds={s: ends[s - 1] - begins[s - 1] for s in updates if s > warmup},
        updates=updates,
        peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        loss=sums.read().loss,
        density=engine.density(),
        bytes_sent={s: b - sent.get(s - 1, 0) for s, b in sent.items()},
        bytes_dense={s: b - dense.get(s - 1, 0) for s, b in dense.items()},
        host_syncs=syncs,
    )
    del run, steps
    gc.collect()
    return result


# ---- phase 2: compile -------------------------------------------------------------------------


def phase_compile(part: Part, sizes: Sizes, device: torch.device) -> None:
    """The recipe with ``compile=True`` across mask updates: graph breaks (counted by Dynamo;
    the log shows each with ``TORCH_LOGS=graph_breaks``), graphs, first-step (compile) and
    later step seconds, the density reached and the FLOPs measured before compiling."""
    from torch._dynamo.utils import counters

    if sizes.compile_backend != "inductor":  # --smoke: Dynamo's tracing without a compiler
        compile_ = torch.compile
        torch.compile = lambda model, **kw: compile_(model, backend=sizes.compile_backend, **kw)
    train = run_configs(
        model=sizes.compile_model,
        dataset=sizes.compile_dataset,
        batch=sizes.compile_batch,
        steps=sizes.compile_steps,
        update_interval=sizes.compile_interval,
        compile=True,
    )["granet"]
    data = cycled_data(train)
    counters.clear()
    run = build_run(train, device=device, data=data)
    run.train_loader = itertools.repeat(resident_batch(data, train.global_batch, device))  # type: ignore[assignment]
    seconds: list[float] = []
    updates: list[int] = []
    began = time.perf_counter()
    for info in train_steps(run, 0, Sums.zeros(device)):
        _synchronize(device)
        now = time.perf_counter()
        seconds.append(now - began)
        began = now
        if info.update is not None:
            updates.append(info.step)
        part.save(steps_done=info.step)
    breaks = dict(counters["graph_break"])
    part.save(
        backend=sizes.compile_backend,
        model=train.model,
        graph_breaks=sum(breaks.values()),
        graph_break_reasons=breaks,
        unique_graphs=counters["stats"]["unique_graphs"],
        first_step_seconds=seconds[0],
        later_step_seconds=statistics.median(seconds[1:]) if len(seconds) > 1 else None,
        updates=updates,
        density=run.engine.density(),
        inference_flops=run.engine.inference_flops(),
    )


# ---- phase 3: benchmark -----------------------------------------------------------------------


def loader_images_per_second(
    data: DataBundle, batch: int, device: torch.device, loader_workers: int, batches: int
) -> float:
    """Images/s the recipe's DataLoader options deliver onto ``device`` alone (pinned on
    CUDA, non-blocking copies, no model), over ``batches`` batches after the first."""
    loader = DataLoader(data.train, batch_size=batch, **loader_options(device, loader_workers))
    items = iter(loader)
    next(items)  # the workers' start
    began = time.perf_counter()
    for _ in range(batches):
        inputs, _ = next(items)
        inputs.to(device, non_blocking=True)
    _synchronize(device)
    return batch * batches / (time.perf_counter() - began)


def compare(dense: list[Measurement], masked: Measurement) -> dict[str, Any]:
    """The benchmark's figures: images/s GraNet / dense over the timed steps without a mask
    update (the same steps in every run), the drift between the two dense runs, one mask
    update / one GraNet step without one (median), peak GPU memory GraNet / dense (the last
    dense run's: the first one's also holds cudnn's autotuning workspaces)."""
    between = [s for s in masked.step_seconds if s not in masked.updates]
    dense_ips = [m.images_per_second(between) for m in dense]
    masked_ips = masked.images_per_second(between)
    step = statistics.median(masked.step_seconds[s] for s in between)
    update = statistics.mean(masked.engine_seconds.values()) if masked.engine_seconds else None
    dense_peak = dense[-1].peak_bytes
    memory = None if masked.peak_bytes is None or not dense_peak else masked.peak_bytes / dense_peak
    drift = abs(dense_ips[-1] - dense_ips[0]) / statistics.mean(dense_ips)
    return {
        "dense_images_per_second": statistics.mean(dense_ips),
        "dense_images_per_second_runs": dense_ips,
        "dense_drift": drift,
        "dense_drift_flagged": drift > DRIFT_LIMIT,
        "granet_images_per_second": masked_ips,
        "granet_images_per_second_with_updates": masked.images_per_second(),
        "throughput_ratio": masked_ips / statistics.mean(dense_ips),
        "granet_step_seconds": step,
        "update_seconds": update,
        "update_per_step": None if update is None else update / step,
        "timed_updates": sorted(masked.engine_seconds),
        "dense_peak_bytes": dense_peak,
        "granet_peak_bytes": masked.peak_bytes,
        "memory_ratio": memory,
        "granet_final_density": masked.density,
    }


def phase_benchmark(part: Part, sizes: Sizes, device: torch.device, loader_workers: int) -> None:
    """Dense, GraNet, dense on GPU-resident batches; then the loader alone and a loader-fed
    dense run (reported apart: they measure the input pipeline, not the engine)."""
    steps = sizes.warmup + sizes.steps
    configs = run_configs(
        model=sizes.model,
        dataset=sizes.dataset,
        batch=sizes.batch,
        steps=steps,
        update_interval=sizes.update_interval,
    )
    data = cycled_data(configs["dense"])
    resident = resident_batch(data, sizes.batch, device)
    runs: list[Measurement] = []
    for name in ("dense", "granet", "dense"):
        print(f"  {name}: {sizes.warmup} warm-up + {sizes.steps} timed steps", flush=True)
        m = measure(name, configs[name], data, device, warmup=sizes.warmup, resident=resident)
        runs.append(m)
        print(f"  {name}: {m.images_per_second():.0f} images/s", flush=True)
        part.save(runs=[asdict(r) for r in runs])
    figures = compare([runs[0], runs[2]], runs[1])
    part.save(figures=figures)
    loader = loader_images_per_second(
        data, sizes.batch, device, loader_workers, batches=sizes.loader_steps
    )
    fed_size = sizes.batch * (2 + sizes.loader_steps)  # the run's steps follow the data's size
    fed_data = DataBundle(
        train=Cycled(data.train, fed_size, pool=sizes.batch),
        test=data.test,
        num_classes=data.num_classes,
        input_shape=data.input_shape,
    )
    fed_train = configs["dense"].replace(train_size=fed_size)
    fed = measure(
        "dense_loader_fed", fed_train, fed_data, device, warmup=2, loader_workers=loader_workers
    )
    figures.update(
        loader_images_per_second=loader,
        loader_fed_dense_images_per_second=fed.images_per_second(),
        loader_fed_dense_steps=fed.steps,
        loader_over_dense=loader / figures["dense_images_per_second"],
        loader_too_slow=loader < LOADER_MARGIN * figures["dense_images_per_second"],
    )
    part.save(figures=figures)


# ---- phase 4: production ----------------------------------------------------------------------


@contextlib.contextmanager
def one_process_group(device: torch.device) -> Iterator[None]:
    """A one-process NCCL group (gloo on the CPU) on a free loopback port, with a 60 s
    timeout and the GPU bound up front (``device_id``), destroyed afterwards."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options: dict[str, Any] = {"timeout": timedelta(seconds=60)}
    if device.type == "cuda":
        options["device_id"] = device
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        **options,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def phase_production(part: Part, sizes: Sizes, device: torch.device) -> None:
    """DDP over a one-process NCCL group, bf16, channels-last, GPU-resident batches, across
    one mask update, without and with the sparse all-reduce hook: step seconds between
    updates, the first step after the update (its stall over the median), bytes all-reduced
    packed / dense between updates, and the host syncs of a steady step, the update step and
    the step after it."""
    dt = sizes.production_interval
    configs = run_configs(
        model=sizes.model,
        dataset=sizes.dataset,
        batch=sizes.production_batch,
        steps=sizes.production_steps,
        update_interval=dt,
    )
    data = cycled_data(configs["granet"])
    resident = resident_batch(data, sizes.production_batch, device)
    warmup = 2
    steady = [s for s in range(warmup + 1, sizes.production_steps + 1) if s % dt and (s - 1) % dt]
    figures: dict[str, Any] = {"update_step": dt, "steady_steps": steady}
    with one_process_group(device):
        for hooked in (False, True):
            name = "sparse_allreduce" if hooked else "plain_allreduce"
            train = configs["granet"].replace(sparse_allreduce=hooked)
            ids = [device.index] if device.type == "cuda" else None
            m = measure(
                name,
                train,
                data,
                device,
                warmup=warmup,
                resident=resident,
                wrap=lambda net, ids=ids: DDP(net, device_ids=ids),
                sync=DistributedSync(),
                watch=(dt - 1, dt, dt + 1),
            )
            median = statistics.median(m.step_seconds[s] for s in steady)
            figures[name] = {
                "step_seconds": median,
                "first_step_after_update_seconds": m.step_seconds[dt + 1],
                "stall_seconds": m.step_seconds[dt + 1] - median,
                "update_engine_seconds": m.engine_seconds.get(dt),
                "host_syncs": {
                    "steady_step": m.host_syncs[dt - 1],
                    "update_step": m.host_syncs[dt],
                    "step_after_update": m.host_syncs[dt + 1],
                },
                "updates": m.updates,
            }
            if hooked:
                sent = sum(m.bytes_sent[s] for s in steady)
                dense = sum(m.bytes_dense[s] for s in steady)
                figures["bytes_ratio"] = sent / dense
                figures["bytes_sent_per_step"] = sent / len(steady)
                figures["bytes_dense_per_step"] = dense / len(steady)
            part.save(figures=figures)
    plain, sparse = figures["plain_allreduce"], figures["sparse_allreduce"]
    figures["hook_step_ratio"] = sparse["step_seconds"] / plain["step_seconds"]
    syncs = sparse["host_syncs"]
    figures["steady_step_host_syncs"] = max(syncs["steady_step"], syncs["step_after_update"])
    part.save(figures=figures)


# ---- the parent: phases in subprocesses -------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """The GPU (name, memory, clocks from nvidia-smi where present) and the software versions."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(device)
    nccl = torch.cuda.nccl.version()
    info.update(
        gpu=props.name,
        gpu_memory_bytes=props.total_memory,
        multiprocessors=props.multi_processor_count,
        capability=f"{props.major}.{props.minor}",
        nccl=".".join(str(v) for v in nccl) if isinstance(nccl, tuple) else str(nccl),
    )
    query = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,pstate"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        values = done.stdout.splitlines()[0].split(", ") if done.returncode == 0 else []
        info["nvidia_smi"] = dict(zip(query.split(","), values, strict=False))
    except (OSError, subprocess.TimeoutExpired, IndexError) as error:
        info["nvidia_smi"] = f"unavailable: {error}"
    return info


def run_subprocess(command: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """``command`` in its own process group, its output echoed as it comes and kept; killed
    after ``timeout`` seconds. Its exit status, whether it timed out, its last output line,
    its seconds."""
    began = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []

    def echo() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        timed_out = True
    reader.join(timeout=10)
    last = [line for line in lines if line.strip()]
    return {
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "summary": f"timed out after {timeout:.0f} s" if timed_out else (last or [""])[-1],
        "seconds": time.monotonic() - began,
    }


def phase_env(phase: str) -> dict[str, str]:
    """A phase's environment: the repository on PYTHONPATH, unbuffered output, NCCL warnings,
    and Dynamo's graph-break log in the compile phase."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_DEBUG="WARN")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if phase == "compile":
        env["TORCH_LOGS"] = "graph_breaks"
    return env


def run_gpu_tests(timeout: float) -> dict[str, Any]:
    """``pytest -m gpu tests/test_gpu.py`` in a subprocess killed after ``timeout`` seconds
    (a failed phase saying so where pytest is not installed)."""
    if importlib.util.find_spec("pytest") is None:
        summary = "pytest is not installed: pip install pytest, then rerun"
        return {"returncode": 1, "timed_out": False, "summary": summary, "seconds": 0.0}
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q"]
    command += ["-p", "no:cacheprovider"]
    return run_subprocess(command, phase_env("tests"), timeout)


def run_phase(phase: str, args: argparse.Namespace, timeout: float, out: Path) -> dict[str, Any]:
    """One phase of this script in a subprocess: its process result and its figures."""
    if phase == "tests":
        return run_gpu_tests(timeout)
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--out", str(out)]
    command += ["--phase-limit", f"{timeout:.0f}", "--loader-workers", str(args.loader_workers)]
    if args.smoke:
        command.append("--smoke")
    result = run_subprocess(command, phase_env(phase), timeout)
    if out.exists():
        result.update(json.loads(out.read_text()))
    return result


def goals_met(phases: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """Each goal of ``GOALS`` against the figures of every phase (a missing figure: not met)."""
    figures: dict[str, Any] = {}
    for record in phases.values():
        figures.update(record.get("figures", {}))
    if "graph_breaks" in phases.get("compile", {}):
        figures["graph_breaks"] = phases["compile"]["graph_breaks"]
    met = {}
    for key, (op, bound) in GOALS.items():
        value = figures.get(key)
        met[key] = value is not None and (value >= bound if op == ">=" else value <= bound)
    return met


def notes(phases: dict[str, dict[str, Any]]) -> list[str]:
    """Warnings about figures that may mislead: dense drift, a loader slower than the GPU."""
    figures = phases.get("benchmark", {}).get("figures", {})
    out = []
    if figures.get("dense_drift_flagged"):
        out.append(
            f"the two dense runs differ by {figures['dense_drift']:.1%} (over "
            f"{DRIFT_LIMIT:.0%}): clocks or thermals moved; the throughput ratio is uncertain"
        )
    if figures.get("loader_too_slow"):
        out.append(
            f"the data loader delivers {figures['loader_images_per_second']:.0f} images/s, less "
            f"than {LOADER_MARGIN}x the dense GPU rate "
            f"({figures['dense_images_per_second']:.0f}): loader-fed training is input-bound"
        )
    return out


def report(record: dict[str, Any]) -> None:
    """Print each phase's outcome, the goals and the warnings."""
    for phase, result in record["phases"].items():
        state = "timed out" if result.get("timed_out") else f"exit {result.get('returncode')}"
        print(f"{phase:<11} {state:<10} {result.get('seconds', 0):6.0f} s  {result.get('summary')}")
    for key, ok in record.get("met", {}).items():
        op, bound = GOALS[key]
        print(f"goal {key} {op} {bound}: {'ok' if ok else 'MISSED'}")
    for line in record.get("warnings", []):
        print(f"WARNING: {line}")


def _write(path: str | None, record: dict[str, Any]) -> None:
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        tmp.replace(path)


def run_check(args: argparse.Namespace) -> int:
    """Every phase in turn, each within min(its limit, the time left); the JSON after each."""
    began = time.monotonic()
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    record: dict[str, Any] = {
        "cuda": device.type == "cuda",
        "smoke": args.smoke,
        "environment": environment(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "phase", "out")},
        "phases": {},
    }
    env = record["environment"]
    print(f"GPU check on {env.get('gpu', 'the CPU (smoke)')}, torch {env['torch']}", flush=True)
    _write(args.json, record)
    parts = Path(args.json or "gpu_check.json").resolve().parent
    for i, phase in enumerate(p for p in PHASES if p not in args.skip):
        left = args.time_limit - (time.monotonic() - began)
        if left < 10:
            record["phases"][phase] = {"skipped": "no time left", "returncode": None}
            continue
        limit = min(LIMITS[phase], left)
        print(f"{i + 1}. {phase} (at most {limit:.0f} s)", flush=True)
        out = parts / f".gpu_check.{phase}.json"
        out.unlink(missing_ok=True)
        record["phases"][phase] = run_phase(phase, args, limit, out)
        out.unlink(missing_ok=True)
        record["met"] = goals_met(record["phases"])
        record["warnings"] = notes(record["phases"])
        record["seconds"] = time.monotonic() - began
        _write(args.json, record)
    report(record)
    failed = [p for p, r in record["phases"].items() if r.get("returncode") != 0]
    ok = not failed and (args.smoke or all(record["met"].values()))
    print(f"GPU check {'passed' if ok else 'FAILED'} in {record['seconds']:.0f} s")
    return 0 if ok else 1


def run_one_phase(args: argparse.Namespace) -> int:
    """The body of one phase's subprocess: its figures to ``--out``, an error recorded."""
    part = Part(Path(args.out))
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(max(1, int(args.phase_limit) - 5))  # 5 s to write before the parent kills
    try:
        device = _device(args.smoke)
        if args.phase == "compile":
            phase_compile(part, sizes, device)
        elif args.phase == "benchmark":
            phase_benchmark(part, sizes, device, 0 if args.smoke else args.loader_workers)
        else:
            phase_production(part, sizes, device)
    except OutOfTime:
        part.save(error=f"out of time after {args.phase_limit} s")
        return 1
    except Exception:
        part.save(error=traceback.format_exc())
        traceback.print_exc()
        return 1
    finally:
        signal.alarm(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=420, help="seconds, the whole check")
    parser.add_argument("--json", help="write the figures to this JSON file (after every phase)")
    parser.add_argument("--loader-workers", type=int, default=6, help="data-loader processes")
    parser.add_argument("--skip", nargs="*", default=[], choices=PHASES, help="phases to skip")
    parser.add_argument("--smoke", action="store_true", help="every phase on the CPU, toy sizes")
    parser.add_argument("--phase", choices=PHASES[1:], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--phase-limit", type=float, default=600, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        return run_one_phase(args)
    if not args.smoke and not torch.cuda.is_available():
        message = "no CUDA device: the GPU check needs one NVIDIA GPU; nothing was run"
        print(message)
        _write(args.json, {"cuda": False, "message": message})
        return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
