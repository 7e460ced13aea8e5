"""Engine overhead on CPU, measured side by side in one run.

(a) masked training step / dense training step, ResNet-20, batch 128 (goal <= 1.02);
(b) one mask update (prune + regrow) / one training step, ResNet-50, batch 8 (goal <= 1.0);
(c) peak memory with the engine / without, ResNet-50 batch 8 incl. one update (goal <= 1.10).

Run: .venv/bin/python benchmarks/bench_engine.py  [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from granet_ray.config import GraNetConfig
from granet_ray.models import build_model
from granet_ray.sparsity import GraNet

NEVER = 10**9  # an update interval no benchmark reaches


def _batch(batch: int, size: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    return x, torch.randint(0, classes, (batch,), generator=gen)


def _setup(model_name: str, engine_cfg: GraNetConfig | None, total: int):
    torch.manual_seed(0)
    model = build_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    engine = None
    if engine_cfg is not None:
        engine = GraNet(model, opt, engine_cfg, total_steps=total, steps_per_epoch=1)
    return model, opt, engine


def _train_step(model: nn.Module, opt, engine, x, y) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if engine is not None:
        engine.step()


def step_ratio(steps: int) -> tuple[float, float]:
    """(a): median step seconds of dense and masked (90% sparse ERK, no update) ResNet-20,
    interleaved so both see the same machine load."""
    x, y = _batch(128, 32, 10)
    cfg = GraNetConfig(method="static", final_density=0.1, update_interval=NEVER, prune_end=NEVER)
    dense = _setup("resnet20", None, NEVER)
    sparse = _setup("resnet20", cfg, NEVER)
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for i in range(steps + 2):
        for key, (model, opt, engine) in (("dense", dense), ("sparse", sparse)):
            start = time.perf_counter()
            _train_step(model, opt, engine, x, y)
            if i >= 2:  # warm-up
                times[key].append(time.perf_counter() - start)
    return statistics.median(times["dense"]), statistics.median(times["sparse"])


def update_ratio(repeats: int) -> tuple[float, float]:
    """(b): seconds of one ResNet-50 training step at batch 8 and of one GraNet mask update
    (global prune + regrow from dense gradients) at density 0.5 -> 0.2."""
    x, y = _batch(8, 224, 1000)
    cfg = GraNetConfig(
        init_density=0.5, final_density=0.2, update_interval=1, prune_start=0, prune_end=1000
    )
    model, opt, engine = _setup("resnet50", cfg, 2000)
    step_times, update_times = [], []
    for _ in range(repeats):
        _train_step(model, opt, None, x, y)  # fresh dense gradients for the regrowth
        start = time.perf_counter()
        stats = engine.step()
        update_times.append(time.perf_counter() - start)
        assert stats is not None and stats["pruned"] > 0 and stats["regrown"] > 0
        start = time.perf_counter()
        _train_step(model, opt, None, x, y)
        step_times.append(time.perf_counter() - start)
    return statistics.median(step_times), statistics.median(update_times)


def peak_rss_mb(with_engine: bool) -> float:
    """(c): peak resident memory (MB) of a fresh process training ResNet-50 at batch 8 for
    4 steps, with the engine doing two mask updates, or without the engine."""
    code = f"""
import resource, sys
sys.path.insert(0, {str(sys.path[0])!r})
import bench_engine as b
from granet_ray.config import GraNetConfig
cfg = GraNetConfig(init_density=0.5, final_density=0.2, update_interval=2, prune_end=10)
model, opt, engine = b._setup("resnet50", cfg if {with_engine} else None, 20)
x, y = b._batch(8, 224, 1000)
for _ in range(4):
    b._train_step(model, opt, engine, x, y)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    console = Console()
    with console.status("(a) ResNet-20 dense vs masked steps"):
        dense_s, masked_s = step_ratio(8 if args.quick else 20)
    with console.status("(b) ResNet-50 training step vs mask update"):
        train_s, update_s = update_ratio(2 if args.quick else 4)
    with console.status("(c) ResNet-50 peak memory with and without the engine"):
        rss_plain, rss_engine = peak_rss_mb(False), peak_rss_mb(True)
    rows = [
        ("(a) masked / dense step, ResNet-20 b128", masked_s, dense_s, masked_s / dense_s, 1.02),
        ("(b) mask update / train step, ResNet-50 b8", update_s, train_s, update_s / train_s, 1.0),
        (
            "(c) peak RSS engine / plain, ResNet-50 b8",
            rss_engine,
            rss_plain,
            rss_engine / rss_plain,
            1.10,
        ),
    ]
    table = Table(title=f"GraNet engine overhead (CPU, {torch.get_num_threads()} threads)")
    for col in ("measure", "ours", "baseline", "ratio", "goal"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    for name, ours, base, ratio, goal in rows:
        unit = "MB" if name.startswith("(c)") else "s"
        ok = "[green]" if ratio <= goal else "[red]"
        table.add_row(
            name, f"{ours:.3f} {unit}", f"{base:.3f} {unit}", f"{ok}{ratio:.3f}", f"<= {goal}"
        )
    console.print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({r[0]: {"ours": r[1], "baseline": r[2], "ratio": r[3]} for r in rows}, f)


if __name__ == "__main__":
    main()
