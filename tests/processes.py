"""Real multi-process tests without Ray: ``gloo_workers`` starts ``nprocs`` processes that
each run ``worker(rank, port, out)`` (init a gloo group on the loopback ``port``, save results
to ``out/<rank>.pt``) and returns every rank's results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from granet_ray.testing.ports import free_port

# A fork server that imports these once starts each worker in well under a second (a plain
# spawn imports torch and torch._dynamo, pulled in by the optimizer, in every process).
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "granet_ray.recipe"]


def gloo_workers(
    worker: Callable[[int, int, str], None], nprocs: int, out: Path
) -> list[dict[str, Any]]:
    """Run ``worker`` on ``nprocs`` processes and load each rank's ``out/<rank>.pt``."""
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    mp.start_processes(
        worker, args=(free_port(), str(out)), nprocs=nprocs, join=True, start_method="forkserver"
    )
    return [torch.load(out / f"{rank}.pt", weights_only=False) for rank in range(nprocs)]
