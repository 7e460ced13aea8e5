"""The rich tables of a run and a checkpoint: a model's per-layer sparsity, a run's outcome,
and a checkpoint's tensors. Inputs are plain data (engine summaries, ``FitOutcome``, the
store's ``CheckpointSummary``). A sweep's tables live with the sweeps (``tune/tables.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.table import Table

from granet_ray.events import FitOutcome

if TYPE_CHECKING:
    from granet_ray.store.summary import CheckpointSummary


def _flops(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def layer_table(summary: dict[str, Any], *, title: str = "Sparse model") -> Table:
    """Per-layer table of an engine summary (``GraNet.summary()``): shape, weights, density,
    dense forward FLOPs per sample, then totals and FLOPs relative to dense. A weight kept
    dense says why; a weight several modules share names the others."""
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
        name = row["name"]
        if not row["prunable"]:
            name += f" (dense: {row['dense']})" if row.get("dense") else " (dense)"
        if row.get("shared"):
            name += f" (also {', '.join(row['shared'])})"
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


def outcome_table(outcome: FitOutcome) -> Table:
    """The run's headline numbers: accuracy, density, FLOPs, checkpoint URI and size."""
    m = outcome.metrics
    table = Table(title=f"run {outcome.name}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("validation accuracy", f"{m['val_accuracy']:.2%} (all workers)")
    table.add_row("density", f"{m['density']:.4f} (sparsity {1 - m['density']:.2%})")
    table.add_row("inference FLOPs", f"{m['inference_flops']:.4f} x dense")
    table.add_row("training FLOPs", f"{m['training_flops']:.4f} x dense")
    table.add_row("mask updates", str(len(outcome.history)))
    table.add_row("checkpoint", outcome.checkpoint_uri)
    table.add_row("checkpoint size", f"{outcome.checkpoint_bytes / 2**20:.2f} MiB")
    table.add_row("plot", outcome.plot_uri)
    return table


def _bytes(count: int) -> str:
    """Decimal human-readable size: 980 B, 12.3 kB, 4.5 MB, 1.2 GB."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def checkpoint_table(summary: CheckpointSummary) -> Table:
    """A checkpoint's tensors: shape, density, bytes and share of the total, plus the
    optimizer state's share; the caption gives the totals against the dense size."""
    table = Table()
    table.add_column("tensor", overflow="fold")
    table.add_column("shape")
    table.add_column("density", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    total = summary.total_bytes
    for t in summary.tensors:
        share = t.bytes / total if total else 0.0
        shape = "x".join(map(str, t.shape)) or "scalar"
        table.add_row(t.name, shape, f"{t.density:.3f}", _bytes(t.bytes), f"{share:.1%}")
    if summary.optimizer_bytes:
        share = summary.optimizer_bytes / total
        table.add_row("(optimizer state)", "", "", _bytes(summary.optimizer_bytes), f"{share:.1%}")
    return table


def checkpoint_totals(summary: CheckpointSummary) -> str:
    """One line: the checkpoint's bytes and files against the dense size."""
    ratio = summary.total_bytes / summary.dense_bytes if summary.dense_bytes else 0.0
    return (
        f"total {_bytes(summary.total_bytes)} ({summary.total_bytes} bytes in "
        f"{summary.file_count} files) against dense {_bytes(summary.dense_bytes)} "
        f"({summary.dense_bytes} bytes): {ratio:.3f} of dense"
    )
