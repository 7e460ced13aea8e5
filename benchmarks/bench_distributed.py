"""Distributed GraNet on this machine, one run, two ratios side by side.

1. Scaling: training throughput (samples/s over all workers, best of epochs 2-4, evaluation
   excluded) of 2 Ray Train workers / 1 worker, MNIST conv net, batch 64 per worker.
   Goal >= 1.7 on a 2-core machine. Printed above it: the same ratio for independent
   processes without any communication (the most the machine gives at that moment; others
   may be using its cores) and for plain synchronous DDP without Ray (single-thread
   processes in lockstep: each waits for the slower one at every gradient all-reduce).
2. Mask-update cost: one synchronized mask update (score all-reduce + prune + regrow +
   exact mask check + re-masking, i.e. ``engine.step()`` on an update step) / one training
   step (forward, backward, DDP all-reduce, optimizer step, ``engine.step()``), 2 gloo
   processes. Goal <= 1.0.
3. Exact mask check on ResNet-50 masks (docs/algorithm.md section 5: bit-packed masks, one
   all-reduce MAX of them and their complement): seconds of ``DistributedSync.check`` per update and
   relative to one ResNet-50 DDP training step at batch 2 x 224 x 224, 2 gloo processes.

    .venv/bin/python benchmarks/bench_distributed.py
    .venv/bin/python benchmarks/bench_distributed.py --check-only   # part 3 alone (~1 min)
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from granet_ray.config import GraNetConfig, RunSettings, preset
from granet_ray.distributed import DistributedSync, pack_masks
from granet_ray.models import build_model
from granet_ray.sparsity import GraNet

BATCH = 64
UPDATE_STEPS = 60  # training steps in the update-cost measurement (update every 5)
CHECK_BATCH = 2  # ResNet-50 samples per process in the check-cost reference step
CHECK_REPEATS = 5


def throughput(num_workers: int, storage: str) -> float:
    """Samples per second of the best epoch after the first (the machine is shared: the best
    epoch is the one least disturbed) of a short run on ``num_workers`` workers, each taking
    ``BATCH`` samples of every global step (weak scaling)."""
    from granet_ray.train import fit

    train = preset("mnist_demo").replace(
        epochs=4,
        train_size=2048,
        global_batch=BATCH * num_workers,
        lr_milestones=(),
        granet={"prune_end": 1, "update_interval": 8},
    )
    run = RunSettings(num_workers=num_workers, storage_path=storage)
    epochs = fit(train, run, progress=False).epochs
    return max(e["samples_per_second"] for e in epochs[1:])


def _independent(rank: int, seconds: float, out: str) -> None:
    """Train steps alone (no communication) for ``seconds``; samples/s written to ``out``."""
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    model = build_model("mnist_convnet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inputs, targets = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        steps += 1
    torch.save(steps * BATCH / (time.perf_counter() - start), f"{out}/alone-{rank}.pt")


def ceiling(processes: int, out: str, seconds: float = 10.0) -> float:
    """Samples/s of ``processes`` independent single-thread trainers together: what this
    (shared) machine can give in parallel right now, communication left out."""
    mp.spawn(_independent, args=(seconds, out), nprocs=processes, join=True)
    return sum(torch.load(f"{out}/alone-{rank}.pt") for rank in range(processes))


def _update_cost(rank: int, port: int, model_name: str, out: str) -> None:
    """Per-step timings on one of two gloo processes with DDP (written to ``out``)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(build_model(model_name))
        shape = (1, 28, 28) if model_name == "mnist_convnet" else (3, 32, 32)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        config = GraNetConfig(init_density=0.5, final_density=0.1, update_interval=5, prune_end=2)
        engine = GraNet(
            model,
            optimizer,
            config,
            total_steps=UPDATE_STEPS,
            steps_per_epoch=UPDATE_STEPS // 3,
            sync=DistributedSync(),
        )
        data = torch.Generator().manual_seed(rank)
        steps, updates = [], []
        for _ in range(UPDATE_STEPS):
            inputs = torch.randn(BATCH, *shape, generator=data)
            targets = torch.randint(0, 10, (BATCH,), generator=data)
            start = time.perf_counter()
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            hook = time.perf_counter()
            update = engine.step()
            end = time.perf_counter()
            (updates if update is not None else steps).append(
                end - hook if update is not None else end - start
            )
        torch.save({"steps": steps[2:], "updates": updates}, f"{out}/{model_name}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def update_cost(model_name: str, out: str) -> tuple[float, float]:
    """(median seconds of a mask update, median seconds of a training step), worst rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_update_cost, args=(port, model_name, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}/{model_name}-{r}.pt") for r in range(2)]
    update = max(statistics.median(r["updates"]) for r in ranks)
    step = max(statistics.median(r["steps"]) for r in ranks)
    return update, step


def _check_cost(rank: int, port: int, out: str) -> None:
    """On one of two gloo processes: ResNet-50 at d_i = 0.5 (ERK), the median seconds of the
    exact mask check and of a DDP training step at batch CHECK_BATCH (written to ``out``)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(build_model("resnet50"))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        config = preset("imagenet_resnet50").granet
        engine = GraNet(model, optimizer, config, total_steps=100_000, steps_per_epoch=1000)
        sync = DistributedSync()
        sync.check(engine.masks, 0)  # warm-up
        checks = []
        for step in range(CHECK_REPEATS):
            start = time.perf_counter()
            sync.check(engine.masks, step)
            checks.append(time.perf_counter() - start)
        data = torch.Generator().manual_seed(rank)
        steps = []
        for _ in range(3):
            inputs = torch.randn(CHECK_BATCH, 3, 224, 224, generator=data)
            targets = torch.randint(0, 1000, (CHECK_BATCH,), generator=data)
            start = time.perf_counter()
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
            engine.step()
            steps.append(time.perf_counter() - start)
        result = {
            "check": statistics.median(checks),
            "step": statistics.median(steps[1:]),
            "weights": sum(m.numel() for m in engine.masks.values()),
            "bytes": pack_masks(engine.masks)[0].numel(),
        }
        torch.save(result, f"{out}/check-{rank}.pt")
    finally:
        dist.destroy_process_group()


def check_cost(out: str) -> str:
    """The exact mask check's cost on ResNet-50 masks, worst rank, as one printed line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_check_cost, args=(port, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}/check-{r}.pt") for r in range(2)]
    check = max(r["check"] for r in ranks)
    step = max(r["step"] for r in ranks)
    return (
        f"exact mask check, ResNet-50 ({ranks[0]['weights'] / 1e6:.1f} M prunable weights, "
        f"{ranks[0]['bytes'] / 1e6:.1f} MB packed, 2 gloo processes): {check * 1e3:.1f} ms per "
        f"update = {check / step:.3f} of one training step at batch {CHECK_BATCH} x 224 x 224 "
        f"({step:.2f} s)"
    )


def main() -> int:
    if "--check-only" in sys.argv[1:]:
        with tempfile.TemporaryDirectory(prefix="granet-bench-") as tmp:
            print(check_cost(tmp))
        return 0
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="granet-bench-") as tmp:
        steps = {}
        for model_name in ("mnist_convnet", "resnet20"):
            update, steps[model_name] = update_cost(model_name, tmp)
            print(
                f"{model_name:>13}: mask update {update * 1e3:7.1f} ms / training step "
                f"{steps[model_name] * 1e3:6.1f} ms = {update / steps[model_name]:.2f}  "
                "(goal <= 1.0)"
            )
        print(check_cost(tmp))
        alone_one, alone_two = ceiling(1, tmp), ceiling(2, tmp)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            one = throughput(1, tmp)
            two = throughput(2, tmp)
        finally:
            ray.shutdown()
    ddp = 2 * BATCH / steps["mnist_convnet"]  # the 2-process DDP steps timed above
    print("throughput, 2 / 1 (MNIST conv net, batch 64 per process):")
    print(f"  independent processes, no communication: {alone_two / alone_one:.2f}")
    print(f"  plain DDP over gloo, no Ray:             {ddp / alone_one:.2f}")
    print(
        f"  Ray Train + GraNet:                      {two / one:.2f}  "
        f"({two:.0f} / {one:.0f} samples/s; goal >= 1.7)"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
