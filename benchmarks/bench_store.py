"""Sparse Arrow CSR checkpoints against dense ``torch.save`` for ResNet-50, side by side.

For 80 / 90 / 95 / 98 % sparsity (ERK masks from the engine, weights masked): checkpoint bytes
over dense ``torch.save`` bytes, save time, and ``load_sparse``-into-model time against
``torch.load`` of the dense state dict, from local disk (page cache) and from a local SeaweedFS
S3 server. Times are the best of ``--repeats`` interleaved runs (the machine may be shared).
Goals: bytes ratio <= 0.245 at 80 % and <= 0.13 at 90 %; local load ratio <= 0.5.

Usage: python benchmarks/bench_store.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.table import Table

from granet_ray.sparsity import erk_densities, initial_masks, prunable_parameters
from granet_ray.store import load_sparse, open_storage, save_sparse
from granet_ray.testing.seaweedfs import SeaweedFS, start_seaweedfs

DENSITIES = (0.2, 0.1, 0.05, 0.02)
BUCKET = "bench"


@dataclass(frozen=True)
class Row:
    """One sparsity level; times in seconds, sizes in bytes."""

    density: float
    sparse_bytes: int
    dense_bytes: int
    sparse_save: float
    dense_save: float
    sparse_load: float
    dense_load: float
    dense_load_into_model: float
    sparse_load_s3: float
    dense_load_s3: float


def sparse_resnet50(density: float, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """ResNet-50 with ERK masks of overall ``density`` applied to its Conv / Linear weights."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    params = prunable_parameters(model)
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    masks = initial_masks(shapes, erk_densities(shapes, density), seed)
    with torch.no_grad():
        for name, p in params.items():
            p.mul_(masks[name])
    return model, masks


def timed(fn: Callable[[], object], times: list[float]) -> None:
    """Run ``fn`` once and record its wall time."""
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir())


def measure(density: float, work: Path, server: SeaweedFS, repeats: int) -> Row:
    model, masks = sparse_resnet50(density)
    target = torchvision.models.resnet50(weights=None)
    options = server.storage_options
    local = str(work / f"sparse-{density}")
    dense_path = work / f"dense-{density}.pt"
    s3_uri = f"s3://{BUCKET}/sparse-{density}"
    bucket = open_storage(f"s3://{BUCKET}", options)
    s3_dense = f"dense-{density}.pt"
    t: dict[str, list[float]] = {
        k: []
        for k in Row.__dataclass_fields__
        if k not in ("density", "sparse_bytes", "dense_bytes")
    }
    for _ in range(repeats):
        timed(lambda: save_sparse(model, local, masks=masks, overwrite=True), t["sparse_save"])
        timed(lambda: torch.save(model.state_dict(), dense_path), t["dense_save"])
    save_sparse(model, s3_uri, masks=masks, storage_options=options, overwrite=True)
    bucket.put(s3_dense, dense_path.read_bytes())
    for _ in range(repeats):
        timed(lambda: load_sparse(local, model=target), t["sparse_load"])
        timed(lambda: torch.load(dense_path), t["dense_load"])
        timed(lambda: target.load_state_dict(torch.load(dense_path)), t["dense_load_into_model"])
        timed(
            lambda: load_sparse(s3_uri, model=target, storage_options=options),
            t["sparse_load_s3"],
        )
        timed(lambda: torch.load(io.BytesIO(bucket.get(s3_dense))), t["dense_load_s3"])
    for name, tensor in model.state_dict().items():  # the loaded model is the saved one
        assert torch.equal(target.state_dict()[name], tensor), name
    return Row(
        density=density,
        sparse_bytes=folder_bytes(local),
        dense_bytes=os.path.getsize(dense_path),
        **{k: min(v) for k, v in t.items()},
    )


def table(rows: list[Row]) -> Table:
    out = Table(title="ResNet-50 checkpoints: sparse Arrow CSR vs dense torch.save")
    for column in (
        "sparsity",
        "bytes sparse / dense",
        "ratio",
        "save s sparse / dense",
        "load s (local) sparse / torch.load",
        "ratio",
        "torch.load+load_state_dict s",
        "load s (S3) sparse / dense",
        "ratio",
    ):
        out.add_column(column, justify="right")
    for r in rows:
        out.add_row(
            f"{1 - r.density:.0%}",
            f"{r.sparse_bytes / 1e6:.1f} MB / {r.dense_bytes / 1e6:.1f} MB",
            f"{r.sparse_bytes / r.dense_bytes:.3f}",
            f"{r.sparse_save:.3f} / {r.dense_save:.3f}",
            f"{r.sparse_load:.3f} / {r.dense_load:.3f}",
            f"{r.sparse_load / r.dense_load:.2f}",
            f"{r.dense_load_into_model:.3f}",
            f"{r.sparse_load_s3:.3f} / {r.dense_load_s3:.3f}",
            f"{r.sparse_load_s3 / r.dense_load_s3:.2f}",
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per timing")
    args = parser.parse_args()
    console = Console(width=200)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = start_seaweedfs(work / "seaweedfs")
        try:
            server.make_bucket(BUCKET)
            rows = [measure(d, work, server, args.repeats) for d in DENSITIES]
        finally:
            server.stop()
    console.print(table(rows))
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; best of {args.repeats}; load-into-model "
        "times include verifying every file's sha256 and building the masks",
        highlight=False,
    )


if __name__ == "__main__":
    main()
