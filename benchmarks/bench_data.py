"""Images per second delivered to one training worker: a packed dataset streamed from a local
SeaweedFS S3 server (cold cache and warm cache) against the same JPEG files read as an
ImageFolder from local disk, side by side in one run.

Both sides: the ImageNet training transforms (decode, RandomResizedCrop 224, flip, normalise)
in ``--loaders`` DataLoader processes, batches of 64 in one epoch's order (the packed side in
its block-shuffled order, prefetching with ``follow`` as training does; the ImageFolder side
in a global shuffle). Cold: an empty shard cache (every shard comes from S3 during the pass);
warm: the cache of the previous pass. The local side reads through the page cache, its best
case. Each repeat runs the three interleaved; the ratios are per repeat, reported as median
and range, for images per wall-clock second (the goal's measure, at the mercy of whatever else
runs on the machine) and per CPU second of the worker's processes. Last, the reader alone: CPU
per image in one process, warm cache against the page cache, interleaved. Goals: warm >= 0.95
and cold >= 0.8 of local disk.

Usage: python benchmarks/bench_data.py [--images 1200] [--shard-mb 8] [--loaders 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from granet_ray.data.pack import pack
from granet_ray.data.packed import PackedDataset
from granet_ray.data.sharding import epoch_shares
from granet_ray.data.vision import imagenet_transforms
from granet_ray.testing.seaweedfs import start_seaweedfs

BUCKET = "bench"
BATCH = 64


def write_images(root: Path, count: int, classes: int = 10) -> None:
    """An ImageFolder tree of ``count`` JPEG files of ImageNet's typical size (about 400 x
    300, smooth content with texture: 20-40 KB each) in train/, and a few in val/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", count), ("val", classes)):
        for i in range(n):
            folder = root / split / f"class{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((400, 300), Image.BICUBIC)
            noise = rng.integers(-12, 12, (300, 400, 3))
            pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=85)


@dataclass(frozen=True)
class Rate:
    """One pass: images per wall-clock second, and per CPU second of this process and its
    loader processes (what the pass costs, whatever else runs on the machine)."""

    wall: float
    cpu: float


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def images_per_second(dataset: Dataset, order: list[int], loaders: int) -> Rate:
    """The rates of one pass of a DataLoader over ``order`` (worker start-up included; the
    loader processes end with the pass, so their CPU time is counted)."""
    batches = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
    cpu, began = cpu_seconds(), time.perf_counter()
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=loaders, prefetch_factor=4)
    count = sum(len(labels) for _, labels in loader)
    del loader
    return Rate(count / (time.perf_counter() - began), count / (cpu_seconds() - cpu))


def streamed(
    uri: str, options: dict[str, Any], cache: str, epoch: int, transform: Any, loaders: int
) -> Rate:
    """The rates of one epoch of the packed dataset at ``uri`` through the shard cache in
    ``cache``, prefetching as a training worker does."""
    data = PackedDataset(uri, storage_options=options, cache_dir=cache, transform=transform)
    order = data.epoch_order(0, epoch)
    data.follow(epoch_shares(len(data), BATCH, seed=0, epoch=epoch, rank=0, world=1, order=order))
    return images_per_second(data, order.tolist(), loaders)


def read_cost(dataset: Dataset, passes: int) -> list[float]:
    """CPU seconds of this process to read, decode and augment every item of ``dataset``
    once, for each of ``passes`` passes (no DataLoader: the reader's own cost)."""
    costs = []
    for _ in range(passes):
        began = time.process_time()
        for i in range(len(dataset)):  # type: ignore[arg-type]
            dataset[i]
        costs.append(time.process_time() - began)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200, help="training images")
    parser.add_argument("--shard-mb", type=float, default=8.0, help="megabytes per shard")
    parser.add_argument("--block-shards", type=int, default=2, help="shards per shuffle block")
    parser.add_argument("--loaders", type=int, default=2, help="DataLoader processes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = Console(width=max(Console().width, 120))
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    server = start_seaweedfs(work / "s3")
    try:
        server.make_bucket(BUCKET)
        options = server.storage_options
        write_images(work / "tree", args.images)
        uri = f"s3://{BUCKET}/packed"
        index = pack(
            work / "tree",
            uri,
            storage_options=options,
            shard_mb=args.shard_mb,
            block_shards=args.block_shards,
        )
        shards = index.splits["train"]
        mean_kb = sum(e.size for e in shards) / sum(e.samples for e in shards) / 1024
        console.print(
            f"{args.images} JPEG files ({mean_kb:.0f} KB each), {len(shards)} shards of about "
            f"{args.shard_mb:g} MB, blocks of {args.block_shards}, {args.loaders} loader "
            "processes, ImageNet training transforms"
        )
        train_tf, _ = imagenet_transforms()
        from torchvision.datasets import ImageFolder

        local = ImageFolder(str(work / "tree" / "train"), transform=train_tf)
        local_order = np.random.default_rng(0).permutation(len(local)).tolist()
        rows: list[tuple[Rate, Rate, Rate]] = []
        for repeat in range(args.repeats):
            cache = str(work / f"cache-{repeat}")
            # local first in even repeats, last in odd ones (a shared machine drifts)
            first = images_per_second(local, local_order, args.loaders) if repeat % 2 else None
            cold = streamed(uri, options, cache, repeat, train_tf, args.loaders)
            warm = streamed(uri, options, cache, repeat, train_tf, args.loaders)
            disk = first or images_per_second(local, local_order, args.loaders)
            shutil.rmtree(cache, ignore_errors=True)
            rows.append((disk, cold, warm))
            console.print(
                f"repeat {repeat + 1}: images/s local {disk.wall:.0f}, S3 cold {cold.wall:.0f}, "
                f"S3 warm {warm.wall:.0f}; per CPU second {disk.cpu:.0f}, {cold.cpu:.0f}, "
                f"{warm.cpu:.0f}"
            )
        table = Table(title=f"one worker, {args.repeats} repeats: median (range) of the ratios")
        for column in ("", "images/s", "ratio to local", "images per CPU s", "ratio to local"):
            table.add_column(column)
        table.add_row(
            "local ImageFolder",
            f"{statistics.median(r[0].wall for r in rows):.0f}",
            "1",
            f"{statistics.median(r[0].cpu for r in rows):.0f}",
            "1",
        )
        for name, k, goal in (("S3 packed, cold cache", 1, 0.8), ("S3 packed, warm", 2, 0.95)):
            cells = [name]
            for field in ("wall", "cpu"):
                ratios = [getattr(r[k], field) / getattr(r[0], field) for r in rows]
                cells.append(f"{statistics.median(getattr(r[k], field) for r in rows):.0f}")
                cells.append(
                    f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})"
                    + (f", goal >= {goal}" if field == "wall" else "")
                )
            table.add_row(*cells)
        console.print(table)
        # the reader alone: one process, the warm cache against the page cache, interleaved
        warm_cache = PackedDataset(
            uri, storage_options=options, cache_dir=str(work / "cache-cost"), transform=train_tf
        )
        read_cost(warm_cache, 1)
        torch.set_num_threads(1)  # as in a loader process
        ratios = []
        for _ in range(args.repeats):
            disk_s, packed_s = read_cost(local, 1)[0], read_cost(warm_cache, 1)[0]
            ratios.append(disk_s / packed_s)
        console.print(
            "reader alone, one process, CPU per image: local ImageFolder / packed warm cache = "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
            "(above 1: the packed reader costs less)"
        )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
