"""``granet-ray ckpt bench``: a checkpoint's model, dense against converted for sparse CPU
inference, per layer and whole, at batch 1 and a larger batch, as a rich table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from granet_ray.config import ConfigError
from granet_ray.inference.bench import ModelBench, benchmark
from granet_ray.models import build_model
from granet_ray.store import load_sparse

# one sample's input shape for the built-in models
INPUT_SHAPES = {
    "mnist_convnet": (1, 28, 28),
    "resnet20": (3, 32, 32),
    "resnet32": (3, 32, 32),
    "vgg19_bn": (3, 32, 32),
    "resnet50": (3, 224, 224),
}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def _ratio(dense: float | None, chosen: float | None) -> str:
    return "-" if not dense or not chosen else f"{dense / chosen:.2f}x"


def bench_table(results: Sequence[ModelBench], *, title: str) -> Table:
    """Per layer and whole model: dense and sparse latency, kernel chosen, speedup, per batch.

    Args:
        results: ``benchmark`` results, one per batch size, of the same model.
        title: The table's title.

    Returns:
        The table: one row per Conv / Linear layer, then the whole model (median of repeats).
    """
    table = Table(title=title, show_footer=True)
    table.add_column("layer", footer="whole model (median)")
    table.add_column("kind")
    table.add_column("density", justify="right")
    for result in results:
        b = f"b{result.batch}"
        dense = sorted(result.dense_s)[len(result.dense_s) // 2]
        sparse = sorted(result.sparse_s)[len(result.sparse_s) // 2]
        table.add_column(f"{b} dense ms", justify="right", footer=_ms(dense))
        table.add_column(f"{b} sparse ms", justify="right", footer=_ms(sparse))
        table.add_column(f"{b} kernel", footer="")
        table.add_column(f"{b} speedup", justify="right", footer=f"{result.speedup:.2f}x")
    names = [layer.name for layer in results[0].layers] if results else []
    by_batch = [{layer.name: layer for layer in result.layers} for result in results]
    for name in names:
        first = by_batch[0][name]
        cells = [name, first.kind, f"{first.density:.3f}"]
        for layers in by_batch:
            layer = layers.get(name)
            if layer is None or layer.reason is not None:
                reason = "dense" if layer is None else f"dense ({layer.reason})"
                cells += ["-", "-", reason, "-"]
                continue
            cells += [
                _ms(layer.dense_s),
                _ms(layer.sparse_s),
                layer.kernel,
                _ratio(layer.dense_s, layer.chosen_s),
            ]
        table.add_row(*cells)
    return table


def bench_checkpoint(
    uri: str,
    model_name: str,
    *,
    batch: int = 32,
    threads: int | None = None,
    repeats: int = 5,
    num_classes: int | None = None,
    storage_options: dict[str, Any] | None = None,
    console: Console | None = None,
) -> int:
    """Load a checkpoint into a built-in model, time it dense and converted, print the table.

    Args:
        uri: The checkpoint (local path or s3://).
        model_name: A ``granet_ray.models`` name (it fixes the input shape).
        batch: The larger batch size (batch 1 is always measured too).
        threads: Threads (None: ``torch.get_num_threads()``).
        repeats: Whole-model timings per path and batch size.
        num_classes: The model's classes when not its default.
        storage_options: For s3:// URIs.
        console: Where to print (default: a new one).

    Returns:
        0.

    Raises:
        ConfigError: An unknown model name, or a batch, thread count or repeats below 1.
    """
    if model_name not in INPUT_SHAPES:
        raise ConfigError(
            f"unknown model {model_name!r}; expected one of {', '.join(INPUT_SHAPES)}"
        )
    if batch < 1 or (threads is not None and threads < 1) or repeats < 1:
        raise ConfigError(f"batch, threads and repeats must be >= 1: {batch}, {threads}, {repeats}")
    console = console or Console()
    model = build_model(model_name, num_classes)
    checkpoint = load_sparse(uri, model=model, storage_options=storage_options)
    batches = (1,) if batch == 1 else (1, batch)
    results = benchmark(
        model,
        checkpoint.masks,
        INPUT_SHAPES[model_name],
        batches=batches,
        threads=threads,
        repeats=repeats,
    )
    used = results[0].threads if results else torch.get_num_threads()
    console.print(bench_table(results, title=f"{checkpoint.uri}: {model_name}, {used} threads"))
    for result in results:
        console.print(
            f"batch {result.batch}: whole model {result.speedup:.2f}x faster than dense torch "
            f"(median of {len(result.speedups)}: {min(result.speedups):.2f}x-"
            f"{max(result.speedups):.2f}x; fastest run against fastest run "
            f"{result.best_speedup:.2f}x)",
            highlight=False,
        )
    return 0
