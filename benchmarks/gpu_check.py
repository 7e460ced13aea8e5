"""The GPU check: one command on one CUDA GPU that proves the GPU training path.

    python benchmarks/gpu_check.py --time-limit 480 --json gpu_check.json

1. The GPU tests (``tests/test_gpu.py``, marked ``gpu``) in a subprocess with a timeout:
   CUDA masks equal CPU masks, an fp16 overflow at an update step postpones it, no host
   sync between mask updates, the recipe under a one-process NCCL group (DDP, the exact mask
   check, a checkpoint round trip), torch.compile with the engine.
2. ResNet-50 on synthetic ImageNet through the recipe (``build_run`` + ``train_steps``), bf16
   autocast, channels-last, batch 256, measured side by side in one run: dense, GraNet,
   dense again (the dense figure is the mean of both). Dense is ``method=static`` at
   ``final_density=1.0``: the engine holds all-ones masks and skips masking, so it is plain
   training. GraNet prunes from density 0.5 to 0.2 (80% sparsity, reached at step 200) with
   a mask update (global prune + regrowth) every 50 steps. Goals: images/s GraNet / dense
   between updates >= 0.98, one mask update / one training step <= 2, peak GPU memory
   GraNet / dense <= 1.05. The first ``--warmup`` steps (cudnn autotuning) are not timed;
   steps are timed with CUDA events (one synchronize at the end of each run).

Needs no Ray and no data: the project on PYTHONPATH, Python 3.12, torch 2.11. Without CUDA it
says so and exits 0. Exit status 1 when a test fails, a goal is missed or time runs out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from granet_ray.config import GraNetConfig, TrainConfig, preset
from granet_ray.data import DataBundle, build_datasets
from granet_ray.recipe import Sums, build_run, loader_options, train_steps

ROOT = Path(__file__).resolve().parent.parent
# figure -> (comparison, bound): the goals
GOALS: dict[str, tuple[str, float]] = {
    "throughput_ratio": (">=", 0.98),
    "update_per_step": ("<=", 2.0),
    "memory_ratio": ("<=", 1.05),
}


# ---- 1. the GPU tests -------------------------------------------------------------------------


def run_gpu_tests(timeout: float) -> dict[str, Any]:
    """``pytest -m gpu tests/test_gpu.py`` in a subprocess (its own process group, killed after
    ``timeout`` seconds); returns its exit status, last line and seconds, printing its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q"]
    command += ["-p", "no:cacheprovider"]
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
    try:
        output, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    print(output, end="" if output.endswith("\n") else "\n", flush=True)
    lines = [line for line in output.splitlines() if line.strip()]
    return {
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "summary": f"timed out after {timeout:.0f} s" if timed_out else (lines or [""])[-1],
        "seconds": time.monotonic() - began,
    }


# ---- 2. the benchmark ---------------------------------------------------------------------------


class Cycled(Dataset):
    """``size`` samples cycling through the first ``pool`` samples of ``base``, held in memory:
    the data loader only copies, so the GPU, not the data, sets the pace."""

    def __init__(self, base: Dataset, size: int, pool: int) -> None:
        self.size = size
        self.samples = [base[i] for i in range(pool)]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.samples[index % len(self.samples)]


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


@dataclass(frozen=True)
class Measurement:
    """One run of ``steps`` global steps of ``batch`` samples. step_seconds: each timed step
    (after the warm-up, keyed by its 1-based number), from the end of the previous step's
    ``engine.step()`` to the end of its own; engine_seconds: ``engine.step()`` alone at each
    mask update; updates: the steps that updated masks; peak_bytes: peak GPU memory (None on
    the CPU); loss: mean training loss; density: at the end."""

    name: str
    batch: int
    steps: int
    step_seconds: dict[int, float]
    engine_seconds: dict[int, float]
    updates: list[int]
    peak_bytes: int | None
    loss: float
    density: float


def benchmark_configs(
    *,
    batch: int,
    steps: int,
    warmup: int,
    update_interval: int,
    model: str = "resnet50",
    dataset: str = "synthetic_imagenet",
) -> dict[str, TrainConfig]:
    """The dense and the GraNet ``TrainConfig`` of the benchmark: the ImageNet ResNet-50
    preset, one epoch of ``warmup + steps`` steps of ``batch``, bf16, channels-last."""
    common: dict[str, Any] = {
        "model": model,
        "dataset": dataset,
        "train_size": batch * (warmup + steps),
        "epochs": 1,
        "global_batch": batch,
        "lr_milestones": (),
        "warmup_epochs": 0.0,
        "precision": "bf16",
        "channels_last": True,
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


def measure(
    name: str,
    train: TrainConfig,
    data: DataBundle,
    device: torch.device,
    *,
    warmup: int,
    loader_workers: int,
) -> Measurement:
    """Train one epoch of ``train`` on ``data`` through the recipe, timing every step after the
    first ``warmup`` (>= 1) and ``engine.step()`` at every mask update."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    run = build_run(train, device=device, data=data, loader_workers=loader_workers)
    marks = Marks(device)
    engine_step = run.engine.step

    def timed_engine_step() -> dict[str, Any] | None:
        marks.mark()
        stats = engine_step()
        marks.mark()
        return stats

    run.engine.step = timed_engine_step  # type: ignore[method-assign]
    sums = Sums.zeros(device)
    updates = [info.step for info in train_steps(run, 0, sums) if info.update is not None]
    points = marks.seconds()
    begins, ends = points[0::2], points[1::2]  # index i: step i + 1
    steps = len(ends)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = Measurement(
        name=name,
        batch=train.global_batch,
        steps=steps,
        step_seconds={s: ends[s - 1] - ends[s - 2] for s in range(warmup + 1, steps + 1)},
        engine_seconds={s: ends[s - 1] - begins[s - 1] for s in updates if s > warmup},
        updates=updates,
        peak_bytes=peak,
        loss=sums.read().loss,
        density=run.engine.density(),
    )
    del run
    gc.collect()
    return result


def compare(dense: list[Measurement], masked: Measurement) -> dict[str, Any]:
    """The figures of the issue: images/s GraNet / dense over the timed steps without a mask
    update (the same steps in every run), one mask update / one GraNet training step without
    one (median), peak GPU memory GraNet / dense (the last dense run's: the first one's peak
    also holds cudnn's autotuning workspaces, which later runs find cached)."""
    between = [s for s in masked.step_seconds if s not in masked.updates]

    def images_per_second(m: Measurement, steps: list[int]) -> float:
        return m.batch * len(steps) / sum(m.step_seconds[s] for s in steps)

    dense_ips = [images_per_second(m, between) for m in dense]
    masked_ips = images_per_second(masked, between)
    step = statistics.median(masked.step_seconds[s] for s in between)
    update = statistics.mean(masked.engine_seconds.values()) if masked.engine_seconds else None
    dense_peak = dense[-1].peak_bytes
    memory = None if masked.peak_bytes is None or not dense_peak else masked.peak_bytes / dense_peak
    return {
        "dense_images_per_second": statistics.mean(dense_ips),
        "dense_images_per_second_runs": dense_ips,
        "granet_images_per_second": masked_ips,
        "granet_images_per_second_with_updates": images_per_second(
            masked, list(masked.step_seconds)
        ),
        "throughput_ratio": masked_ips / statistics.mean(dense_ips),
        "granet_step_seconds": step,
        "update_seconds": update,
        "update_per_step": None if update is None else update / step,
        "timed_updates": sorted(masked.engine_seconds),
        "dense_peak_bytes": dense_peak,
        "dense_peak_bytes_runs": [m.peak_bytes for m in dense],
        "granet_peak_bytes": masked.peak_bytes,
        "memory_ratio": memory,
        "granet_final_density": masked.density,
    }


def goals_met(figures: dict[str, Any]) -> dict[str, bool]:
    """Each goal of ``GOALS``: met or not (a missing figure is not met)."""
    met = {}
    for key, (op, bound) in GOALS.items():
        value = figures.get(key)
        met[key] = value is not None and (value >= bound if op == ">=" else value <= bound)
    return met


def benchmark_data(train: TrainConfig) -> DataBundle:
    """``train``'s dataset, its training split cycling through the first ``global_batch``
    samples (``Cycled``)."""
    base = build_datasets(train.dataset, train_size=train.global_batch, seed=train.seed)
    return DataBundle(
        train=Cycled(base.train, train.train_size or train.global_batch, pool=train.global_batch),
        test=base.test,
        num_classes=base.num_classes,
        input_shape=base.input_shape,
    )


def loader_images_per_second(
    data: DataBundle, batch: int, device: torch.device, loader_workers: int, batches: int = 40
) -> float:
    """Images/s the recipe's DataLoader options deliver alone (pinned on CUDA, no model),
    over ``batches`` batches after the first (prefetched ones included): above the training
    rate, the data sets no limit."""
    loader = DataLoader(data.train, batch_size=batch, **loader_options(device, loader_workers))
    items = iter(loader)
    next(items)  # the workers' start
    began = time.perf_counter()
    for _ in range(batches):
        next(items)
    return batch * batches / (time.perf_counter() - began)


def benchmark_runs(
    configs: dict[str, TrainConfig],
    data: DataBundle,
    device: torch.device,
    *,
    warmup: int,
    loader_workers: int,
) -> Iterator[Measurement]:
    """Dense, GraNet and dense again (see the module docstring), each as it finishes:
    ``compare([first, third], second)`` gives the figures."""
    for name in ("dense", "granet", "dense"):
        train = configs[name]
        steps = len(data.train) // train.global_batch - warmup  # type: ignore[arg-type]
        print(
            f"  {name}: {warmup} warm-up + {steps} timed steps of {train.global_batch}", flush=True
        )
        yield measure(name, train, data, device, warmup=warmup, loader_workers=loader_workers)


# ---- reporting and main ------------------------------------------------------------------------


def report(figures: dict[str, Any], runs: list[Measurement]) -> None:
    """Print the figures side by side with their goals."""
    met = goals_met(figures)
    gib = 2.0**30
    rows = [
        (
            "images/s between updates, GraNet / dense",
            f"{figures['granet_images_per_second']:.0f}",
            f"{figures['dense_images_per_second']:.0f}",
            "throughput_ratio",
        ),
        (
            "one mask update / one training step (s)",
            _num(figures["update_seconds"]),
            _num(figures["granet_step_seconds"]),
            "update_per_step",
        ),
        (
            "peak GPU memory, GraNet / dense (GiB)",
            _num(None if runs[1].peak_bytes is None else runs[1].peak_bytes / gib),
            _num(
                None if figures["dense_peak_bytes"] is None else figures["dense_peak_bytes"] / gib
            ),
            "memory_ratio",
        ),
    ]
    print(f"{'measure':<42}{'GraNet':>10}{'dense':>10}{'ratio':>8}  goal")
    for label, ours, base, key in rows:
        op, bound = GOALS[key]
        ok = "ok" if met[key] else "MISSED"
        print(f"{label:<42}{ours:>10}{base:>10}{_num(figures[key]):>8}  {op} {bound} {ok}")
    dense_runs = ", ".join(f"{v:.0f}" for v in figures["dense_images_per_second_runs"])
    print(
        f"images/s: dense {figures['dense_images_per_second']:.0f} (runs {dense_runs}), "
        f"GraNet {figures['granet_images_per_second']:.0f} between updates, "
        f"{figures['granet_images_per_second_with_updates']:.0f} with its "
        f"{len(figures['timed_updates'])} timed updates (steps {figures['timed_updates']}); "
        f"GraNet density at the end {figures['granet_final_density']:.3f}; "
        f"mean losses {', '.join(f'{m.name} {m.loss:.3f}' for m in runs)}"
    )
    if "loader_images_per_second" in figures:
        print(f"the data loader alone: {figures['loader_images_per_second']:.0f} images/s")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _write(path: str | None, record: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


class OutOfTime(Exception):
    """The check ran past its time limit."""


def _out_of_time(signum: int, frame: Any) -> None:
    raise OutOfTime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=480, help="seconds, the whole check")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--batch", type=int, default=256, help="samples per step")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (>= 1)")
    parser.add_argument("--update-interval", type=int, default=50, help="GraNet's dT, steps")
    parser.add_argument("--loader-workers", type=int, default=3, help="data-loader processes")
    parser.add_argument("--skip-tests", action="store_true", help="the benchmark only")
    args = parser.parse_args(argv)
    if min(args.batch, args.steps, args.warmup, args.update_interval) < 1:
        parser.error("--batch, --steps, --warmup and --update-interval must be at least 1")
    if not torch.cuda.is_available():
        message = "no CUDA device: the GPU check needs one NVIDIA GPU; nothing was run"
        print(message)
        _write(args.json, {"cuda": False, "message": message})
        return 0
    began = time.monotonic()
    device = torch.device("cuda", torch.cuda.current_device())
    record: dict[str, Any] = {
        "cuda": True,
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
    }
    print(
        f"GPU check on {record['device']}, torch {record['torch']} (CUDA {record['cuda_version']})"
    )
    ok = True
    if not args.skip_tests:
        print("1. GPU tests (pytest -m gpu tests/test_gpu.py)", flush=True)
        record["tests"] = run_gpu_tests(timeout=min(300.0, 0.5 * args.time_limit))
        ok = record["tests"]["returncode"] == 0
        print(f"GPU tests: {record['tests']['summary']} ({record['tests']['seconds']:.0f} s)")
    left = args.time_limit - (time.monotonic() - began)
    print(f"2. ResNet-50 benchmark (at most {left:.0f} s left)", flush=True)
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(max(1, int(left)))
    runs: list[Measurement] = []
    try:
        configs = benchmark_configs(
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            update_interval=args.update_interval,
        )
        data = benchmark_data(configs["dense"])
        loader = loader_images_per_second(data, args.batch, device, args.loader_workers)
        print(f"  the data loader alone: {loader:.0f} images/s", flush=True)
        for m in benchmark_runs(
            configs, data, device, warmup=args.warmup, loader_workers=args.loader_workers
        ):
            runs.append(m)
            seconds = sum(m.step_seconds.values())
            print(f"  {m.name}: {m.batch * len(m.step_seconds) / seconds:.0f} images/s overall")
    except OutOfTime:
        print(f"out of time: the check ran past --time-limit {args.time_limit:.0f} s")
        record["benchmark"] = {"timed_out": True}
        record["runs"] = [asdict(m) for m in runs]
        _write(args.json, record)
        return 1
    finally:
        signal.alarm(0)
    figures = {**compare([runs[0], runs[2]], runs[1]), "loader_images_per_second": loader}
    report(figures, runs)
    met = goals_met(figures)
    record["benchmark"] = {"figures": figures, "goals": GOALS, "met": met}
    record["runs"] = [asdict(m) for m in runs]
    record["seconds"] = time.monotonic() - began
    _write(args.json, record)
    ok = ok and all(met.values())
    print(f"GPU check {'passed' if ok else 'FAILED'} in {record['seconds']:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
