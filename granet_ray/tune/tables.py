"""The tables of a sweep: its trials and its configurations over seeds (rich). Inputs are the
sweep's plain results (``TrialRow``, ``GroupSummary``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.table import Table

from granet_ray.tune.results import GroupSummary, TrialRow


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


_STATUS_STYLE = {
    "finished": "green",
    "stopped": "yellow",
    "error": "red",
    "unfinished": "dim",
    "planned": "cyan",
}


def trials_table(rows: Sequence[TrialRow], *, title: str = "Trials") -> Table:
    """Every trial: its name (variant, grid values and seed: ``df`` final density, ``dt``
    update interval in steps, ``w`` pruning window in epochs, ``p`` initial regeneration
    fraction, ``s`` seed), start density, status and last epoch, validation accuracy,
    density reached, and inference / training FLOPs relative to dense."""
    table = Table(title=title)
    table.add_column("trial", no_wrap=True)
    for name in ("d_i", "status", "epoch", "val acc", "density", "inf FLOPs", "train FLOPs"):
        table.add_column(name, justify="left" if name == "status" else "right")
    for r in rows:
        table.add_row(
            r.name,
            f"{r.train.granet.start_density:g}",
            f"[{_STATUS_STYLE[r.status]}]{r.status}[/]",
            f"{r.epoch}/{r.train.epochs}",
            _pct(r.accuracy),
            _num(r.density, 4),
            _num(r.inference_flops),
            _num(r.training_flops),
        )
    counts = {s: sum(r.status == s for r in rows) for s in _STATUS_STYLE}
    table.caption = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return table


def groups_table(
    groups: Sequence[GroupSummary], *, front: Iterable[str] = (), best: Iterable[str] = ()
) -> Table:
    """Per configuration over seeds: accuracy mean ± std (min-max), density and FLOPs; ``*``
    marks the Pareto front (by ``group``), ``best`` the exported presets."""
    front, best = set(front), set(best)
    table = Table(title="Configurations (finished trials, over seeds)")
    table.add_column("configuration", no_wrap=True)
    table.add_column("seeds", justify="right")
    table.add_column("val acc mean ± std", justify="right")
    table.add_column("min-max", justify="right")
    table.add_column("sparsity", justify="right")
    table.add_column("inf FLOPs", justify="right")
    table.add_column("train FLOPs", justify="right")
    table.add_column("", justify="left")
    for g in groups:
        marks = ("Pareto " if g.group in front else "") + ("preset" if g.group in best else "")
        table.add_row(
            g.group,
            str(len(g.seeds)),
            f"{g.accuracy_mean:.2%} ± {g.accuracy_std:.2%}",
            f"{g.accuracy_min:.2%}-{g.accuracy_max:.2%}",
            f"{g.sparsity:.2%}",
            f"{g.inference_flops:.3f}",
            f"{g.training_flops:.3f}",
            marks.strip(),
        )
    return table
