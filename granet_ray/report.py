"""What a person sees: rich progress bars and the per-layer sparsity table. No Ray, no I/O."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def training_progress(console: Console | None = None, *, disable: bool = False) -> Progress:
    """A progress bar over optimizer steps whose ``status`` field shows loss, density and the
    next mask update (set it with ``progress.update(task, status=...)``)."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=disable,
    )


def step_status(
    *, epoch: int, loss: float, density: float, next_update: int | None, accuracy: float | None
) -> str:
    """One line for the progress bar: epoch, loss, accuracy, density, next mask update step."""
    parts = [f"epoch {epoch}", f"loss {loss:.4f}"]
    if accuracy is not None:
        parts.append(f"val acc {accuracy:.2%}")
    parts.append(f"density {density:.4f}")
    parts.append(f"next update {next_update}" if next_update is not None else "masks final")
    return " | ".join(parts)


def _flops(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def layer_table(summary: dict[str, Any], *, title: str = "Sparse model") -> Table:
    """Per-layer table of an engine summary (``GraNet.summary()``): shape, weights, density,
    dense forward FLOPs per sample, then totals and FLOPs relative to dense."""
    table = Table(title=title, show_footer=True)
    total_weights = sum(_numel(row["shape"]) for row in summary["layers"])
    active = sum(_numel(row["shape"]) * row["density"] for row in summary["layers"])
    dense_flops = sum(row["flops"] or 0.0 for row in summary["layers"])
    sparse_flops = sum((row["flops"] or 0.0) * row["density"] for row in summary["layers"])
    table.add_column("layer", footer="total")
    table.add_column("shape")
    table.add_column("weights", justify="right", footer=f"{total_weights:,}")
    table.add_column("active", justify="right", footer=f"{round(active):,}")
    table.add_column("density", justify="right", footer=f"{active / total_weights:.4f}")
    table.add_column("FLOPs dense", justify="right", footer=_flops(dense_flops))
    table.add_column("FLOPs sparse", justify="right", footer=_flops(sparse_flops))
    for row in summary["layers"]:
        numel = _numel(row["shape"])
        name = row["name"] if row["prunable"] else f"{row['name']} (dense)"
        flops = row["flops"]
        table.add_row(
            name,
            "x".join(str(s) for s in row["shape"]),
            f"{numel:,}",
            f"{round(numel * row['density']):,}",
            f"{row['density']:.4f}",
            _flops(flops),
            _flops(None if flops is None else flops * row["density"]),
        )
    caption = [f"prunable density {summary['density']:.4f}"]
    if summary.get("inference_flops") is not None:
        caption.append(f"inference FLOPs {summary['inference_flops']:.4f}x dense")
    if summary.get("training_flops") is not None:
        caption.append(f"training FLOPs {summary['training_flops']:.4f}x dense")
    table.caption = " | ".join(caption)
    return table


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
