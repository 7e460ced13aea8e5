"""The sparse gradient all-reduce (``distributed.SparseAllReduce``, ``--sparse-allreduce``).

1. Bytes: gradient bytes one worker all-reduces per step between mask updates, with the hook
   / without (plain DDP), on ResNet-50 with ERK masks at densities 1.0, 0.5, 0.2, 0.1, 0.02,
   counted exactly by the hook from its packed sizes (DDP's real buckets, after their
   rebuild at the first step; one process, no timing). Goal: ratio <= density + the
   non-prunable share (biases, norms) + 0.02. Then the same on paper for 8 workers (a ring
   all-reduce sends 2 (W - 1) / W x the vector per worker).
2. Time: seconds per training step (forward, backward, all-reduce, optimizer, engine) with
   the hook / without, 2 gloo processes (one thread each), on CIFAR-shaped synthetic data
   at density 0.1 (static ERK masks, so every step is one between updates): ResNet-20 at
   the paper's global batch 128 and at 16 (where the all-reduce weighs more; goal <= 1.0
   for both), and VGG-19-BN (20 M weights) at 8. ROUNDS rounds of STEPS steps of each run,
   interleaved step by step (which goes first alternating); a round's ratio is the ratio of
   its medians.

    .venv/bin/python benchmarks/bench_allreduce.py
    .venv/bin/python benchmarks/bench_allreduce.py --bytes-only   # part 1 alone (~1 min)
"""

from __future__ import annotations

import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from granet_ray.config import GraNetConfig, TrainConfig
from granet_ray.distributed import DistributedSync, register_sparse_allreduce
from granet_ray.models import build_model
from granet_ray.recipe import Run, StepInfo, Sums, build_run, train_steps
from granet_ray.sparsity import GraNet

CPU = torch.device("cpu")
DENSITIES = (1.0, 0.5, 0.2, 0.1, 0.02)
PAPER_WORKERS = 8
TIMING_DENSITY = 0.1
TIMINGS = (("resnet20", 128, True), ("resnet20", 16, True), ("vgg19_bn", 8, False))  # goal?
WARMUP = 3  # steps per run before timing (DDP rebuilds its buckets after the first)
ROUNDS = 5
STEPS = 10  # timed steps per run and round


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _static(density: float) -> GraNetConfig:
    """Fixed ERK masks of ``density`` (no mask updates)."""
    return GraNetConfig(method="static", final_density=density)


def bytes_per_step(model_name: str, density: float, shape: tuple[int, ...]) -> dict[str, float]:
    """Bytes all-reduced at the second step (after DDP's bucket rebuild) by the hook and by
    plain DDP, and the non-prunable share of the gradient entries; needs a process group."""
    torch.manual_seed(0)
    model = DDP(build_model(model_name))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    engine = GraNet(model, optimizer, _static(density), total_steps=10, steps_per_epoch=10)
    state = register_sparse_allreduce(model, engine)
    assert state is not None
    inputs, targets = torch.randn(2, *shape), torch.tensor([0, 1])
    for _ in range(2):
        sent, dense = state.bytes_sent, state.bytes_dense
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        engine.step()
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(p.numel() for p in engine.params.values())
    return {
        "sent": state.bytes_sent - sent,
        "dense": state.bytes_dense - dense,
        "share": 1 - prunable / total,
        "density": engine.density(),
    }


def bytes_table() -> list[dict[str, float]]:
    """``bytes_per_step`` of ResNet-50 at every density of ``DENSITIES`` (one process)."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        return [bytes_per_step("resnet50", d, (3, 64, 64)) for d in DENSITIES]
    finally:
        dist.destroy_process_group()


def _endless(run: Run) -> Iterator[StepInfo]:
    epoch = 0
    while True:
        yield from train_steps(run, epoch % run.train.epochs, Sums.zeros(CPU))
        epoch += 1


def _timing(rank: int, port: int, model: str, batch: int, out: str) -> None:
    """On one of two gloo processes: the median seconds per step of each round, without and
    with the hook, and the hook's bytes (written to ``out``)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        train = TrainConfig(
            model=model,
            dataset="synthetic_cifar10",
            train_size=batch * 8,
            epochs=50,
            global_batch=batch,
            lr=0.1,
            lr_milestones=(),
            precision="fp32",
            granet=_static(TIMING_DENSITY),
        )
        runs = {
            on: build_run(
                train.replace(sparse_allreduce=on),
                device=CPU,
                rank=rank,
                world=2,
                wrap=DDP,
                sync=DistributedSync(),
            )
            for on in (False, True)
        }
        steps = {on: _endless(run) for on, run in runs.items()}
        for on in runs:
            for _ in range(WARMUP):
                next(steps[on])
        medians: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(ROUNDS):
            seconds: dict[bool, list[float]] = {False: [], True: []}
            for i in range(STEPS):  # one step of each run in turn, the first alternating
                for on in (False, True) if i % 2 == 0 else (True, False):
                    start = time.perf_counter()
                    next(steps[on])
                    seconds[on].append(time.perf_counter() - start)
            for on, values in seconds.items():
                medians[on].append(statistics.median(values))
        state = runs[True].allreduce
        assert state is not None
        result = {"medians": medians, "bytes": (state.bytes_sent, state.bytes_dense)}
        torch.save(result, f"{out}/timing-{model}-{batch}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def timing(model: str, batch: int, out: str) -> dict[str, object]:
    """Both workers' ``_timing`` of ``model`` at global batch ``batch``: per round the slower
    worker's median seconds per step without and with the hook; the hook's bytes."""
    mp.spawn(_timing, args=(_free_port(), model, batch, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}/timing-{model}-{batch}-{r}.pt") for r in range(2)]
    plain = [max(r["medians"][False][i] for r in ranks) for i in range(ROUNDS)]
    hook = [max(r["medians"][True][i] for r in ranks) for i in range(ROUNDS)]
    return {"plain": plain, "hook": hook, "bytes": ranks[0]["bytes"]}


def main() -> int:
    torch.set_num_threads(2)
    rows = bytes_table()
    share = rows[0]["share"]
    print("1. ResNet-50 gradient bytes per step between mask updates, one worker (ERK masks);")
    print(f"   non-prunable share of the gradient entries: {share:.4f}")
    print("   density   hook MB   plain MB   ratio   goal (<= d + share + 0.02)")
    worst = 0.0
    for row in rows:
        ratio = row["sent"] / row["dense"]
        goal = row["density"] + share + 0.02
        worst = max(worst, ratio - goal)
        print(
            f"   {row['density']:7.3f}  {row['sent'] / 1e6:8.2f}  {row['dense'] / 1e6:9.2f}"
            f"  {ratio:6.4f}   {goal:6.4f} {'ok' if ratio <= goal else 'MISSED'}"
        )
    ring = 2 * (PAPER_WORKERS - 1) / PAPER_WORKERS
    dense_mb = rows[0]["dense"] / 1e6
    tenth = next(r for r in rows if abs(r["density"] - 0.1) < 1e-3)
    print(
        f"   On paper, {PAPER_WORKERS} workers (ring all-reduce: {ring:.2f} x the vector per "
        f"worker): {ring * dense_mb:.0f} MB of gradients per worker and step with plain DDP, "
        f"{ring * tenth['sent'] / 1e6:.0f} MB with the hook at density 0.1, "
        f"{ring * rows[-1]['sent'] / 1e6:.0f} MB at 0.02."
    )
    if "--bytes-only" in sys.argv[1:]:
        return 0 if worst <= 0 else 1
    print(
        f"2. Seconds per step, 2 gloo processes, density {TIMING_DENSITY}, "
        f"{ROUNDS} rounds of {STEPS} steps of each (interleaved step by step)"
    )
    ratios_ok = True
    with tempfile.TemporaryDirectory(prefix="granet-bench-") as tmp:
        for model, batch, goal in TIMINGS:
            result = timing(model, batch, tmp)
            plain, hook = result["plain"], result["hook"]
            ratios = [h / p for h, p in zip(hook, plain, strict=True)]
            sent, dense = result["bytes"]
            ratio = statistics.median(ratios)
            ratios_ok &= ratio <= 1.0 or not goal
            print(
                f"   {model}, global batch {batch}: plain {statistics.median(plain) * 1e3:.1f} ms "
                f"(rounds {', '.join(f'{p * 1e3:.1f}' for p in plain)}), hook "
                f"{statistics.median(hook) * 1e3:.1f} ms "
                f"(rounds {', '.join(f'{h * 1e3:.1f}' for h in hook)}); ratio {ratio:.3f} "
                f"(rounds {min(ratios):.3f}..{max(ratios):.3f}{'; goal <= 1.0' if goal else ''}); "
                f"bytes hook / plain {sent / dense:.3f}"
            )
    return 0 if worst <= 0 and ratios_ok else 1


if __name__ == "__main__":
    sys.exit(main())
