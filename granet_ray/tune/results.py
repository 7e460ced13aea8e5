"""What a sweep produced, as plain data: per-trial rows, per-configuration means over seeds,
the Pareto front of accuracy against sparsity, the best configuration per sparsity level, and
the files made of them (CSV, Markdown, the Pareto plot's PNG). No Ray, no I/O; the rich
tables are in ``granet_ray.tune.tables``.

Accuracies are validation accuracies after the last epoch; only trials that ran all their
epochs ("finished") enter the means, the front and the presets, so every compared number
comes from the same training budget.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from granet_ray.config import TrainConfig
from granet_ray.ui.plots import pareto_plot


@dataclass(frozen=True)
class TrialRow:
    """One trial's outcome.

    status: finished (all epochs), stopped (early, by ASHA), error, unfinished (the sweep
    was interrupted first), or planned (not run: a dry run). epoch: the last reported epoch
    (0: none). accuracy: validation accuracy at that epoch. density: the prunable weights
    kept at that epoch. inference_flops, training_flops: relative to the dense model.
    checkpoint: URI of the trial's last sparse checkpoint (open it with ``load_sparse``).
    """

    name: str
    group: str
    variant: str
    seed: int
    train: TrainConfig
    status: str
    epoch: int = 0
    accuracy: float | None = None
    density: float | None = None
    inference_flops: float | None = None
    training_flops: float | None = None
    checkpoint: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class GroupSummary:
    """A configuration's finished trials over seeds: accuracy mean and sample standard
    deviation (0 for one seed), min and max; mean density and FLOPs; ``train`` is the
    configuration of its lowest seed."""

    group: str
    variant: str
    final_density: float
    train: TrainConfig
    seeds: tuple[int, ...]
    accuracy_mean: float
    accuracy_std: float
    accuracy_min: float
    accuracy_max: float
    density: float
    inference_flops: float
    training_flops: float

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density


def group_trials(rows: Iterable[TrialRow]) -> list[GroupSummary]:
    """One ``GroupSummary`` per configuration with finished trials, in trial order."""
    groups: dict[str, list[TrialRow]] = {}
    for row in rows:
        if row.status == "finished":
            groups.setdefault(row.group, []).append(row)
    summaries = []
    for group, members in groups.items():
        members = sorted(members, key=lambda r: r.seed)
        accuracy = [float(r.accuracy or 0.0) for r in members]
        summaries.append(
            GroupSummary(
                group=group,
                variant=members[0].variant,
                final_density=members[0].train.granet.final_density,
                train=members[0].train,
                seeds=tuple(r.seed for r in members),
                accuracy_mean=statistics.fmean(accuracy),
                accuracy_std=statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                accuracy_min=min(accuracy),
                accuracy_max=max(accuracy),
                density=statistics.fmean(float(r.density or 0.0) for r in members),
                inference_flops=statistics.fmean(float(r.inference_flops or 0) for r in members),
                training_flops=statistics.fmean(float(r.training_flops or 0) for r in members),
            )
        )
    return summaries


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (sparsity, accuracy) points no other point dominates (at least as
    sparse and as accurate, better in one), ordered by sparsity."""
    front = [
        i
        for i, (s, a) in enumerate(points)
        if not any(s2 >= s and a2 >= a and (s2, a2) != (s, a) for s2, a2 in points)
    ]
    return sorted(front, key=lambda i: points[i])


def best_per_density(groups: Iterable[GroupSummary]) -> dict[float, GroupSummary]:
    """For each target final density, the configuration with the highest mean accuracy
    (ties: fewer training FLOPs, then name), ordered by density, densest first."""
    best: dict[float, GroupSummary] = {}
    for g in groups:
        current = best.get(g.final_density)
        key = (-g.accuracy_mean, g.training_flops, g.group)
        if current is None or key < (-current.accuracy_mean, current.training_flops, current.group):
            best[g.final_density] = g
    return dict(sorted(best.items(), reverse=True))


@dataclass(frozen=True)
class Analysis:
    """A complete sweep's groups (``group_trials``), the names of those on the Pareto front of
    mean accuracy against sparsity (by sparsity), and the best group per target density."""

    groups: list[GroupSummary]
    front: list[str]
    best: dict[float, GroupSummary]


def analyze(rows: Sequence[TrialRow]) -> Analysis:
    """``Analysis`` of the finished trials among ``rows``."""
    groups = group_trials(rows)
    front = pareto_front([(g.sparsity, g.accuracy_mean) for g in groups])
    return Analysis(groups, [groups[i].group for i in front], best_per_density(groups))


def pareto_png(rows: Sequence[TrialRow], analysis: Analysis, *, title: str) -> bytes:
    """``plots.pareto_plot`` of a sweep: finished trials, group means, the front, and the
    trials stopped early."""

    def points(status: str) -> list[tuple[str, float, float]]:
        return [
            (r.variant, 1 - (r.density or 0.0), r.accuracy or 0.0)
            for r in rows
            if r.status == status
        ]

    groups = {g.group: g for g in analysis.groups}
    return pareto_plot(
        points("finished"),
        [(g.variant, g.sparsity, g.accuracy_mean, g.accuracy_std) for g in analysis.groups],
        [(groups[n].variant, groups[n].sparsity, groups[n].accuracy_mean) for n in analysis.front],
        stopped=points("stopped"),
        title=title,
    )


def summary_markdown(name: str, rows: Sequence[TrialRow], analysis: Analysis) -> str:
    """The sweep's ``summary.md``: trial counts, ``comparison_markdown``, the Pareto front
    and the best configuration per target density."""
    counts = {s: sum(r.status == s for r in rows) for s in ("finished", "stopped", "error")}
    groups = {g.group: g for g in analysis.groups}
    front = ", ".join(
        f"{n} ({groups[n].sparsity:.2%}, {groups[n].accuracy_mean:.2%})" for n in analysis.front
    )
    best = ", ".join(f"{d:g}: {g.group}" for d, g in analysis.best.items())
    return "\n".join(
        [
            f"# Sweep {name}",
            "",
            f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
            "Validation accuracy (%) after the last epoch, mean ± sample std over seeds:",
            "",
            comparison_markdown(analysis.groups),
            f"Pareto front (sparsity, mean accuracy): {front}",
            "",
            f"Best configuration per target density: {best}",
            "",
        ]
    )


def comparison_markdown(groups: Sequence[GroupSummary]) -> str:
    """A Markdown table, one row per configuration without its final density (the variant
    and any other grid fields), one column per sparsity level: validation accuracy in %
    as mean ± std over seeds (n seeds); the best mean of each column in bold."""
    levels = sorted({g.final_density for g in groups}, reverse=True)

    def row_key(g: GroupSummary) -> str:
        parts = [p for p in g.group.split("_") if p != f"df{g.final_density:g}"]
        return "_".join(parts) or g.variant

    rows: dict[str, dict[float, GroupSummary]] = {}
    for g in groups:
        rows.setdefault(row_key(g), {})[g.final_density] = g
    top = {
        level: max((g.accuracy_mean for g in groups if g.final_density == level), default=None)
        for level in levels
    }
    header = "| configuration | " + " | ".join(f"{100 * (1 - d):g}% sparsity" for d in levels)
    header += " |"
    lines = [header, "|---|" + "---|" * len(levels)]
    for name, cells in rows.items():
        out = []
        for level in levels:
            g = cells.get(level)
            if g is None:
                out.append("-")
                continue
            text = f"{100 * g.accuracy_mean:.2f} ± {100 * g.accuracy_std:.2f} (n={len(g.seeds)})"
            out.append(f"**{text}**" if g.accuracy_mean == top[level] else text)
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = (
    "name",
    "group",
    "variant",
    "method",
    "seed",
    "start_density",
    "final_density",
    "update_interval",
    "prune_start",
    "prune_end",
    "regrow_fraction",
    "status",
    "epoch",
    "epochs",
    "accuracy",
    "density",
    "inference_flops",
    "training_flops",
    "checkpoint",
    "error",
)


def trials_csv(rows: Iterable[TrialRow]) -> bytes:
    """Every trial as a CSV row (``CSV_COLUMNS``)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        g = r.train.granet
        writer.writerow(
            [
                r.name,
                r.group,
                r.variant,
                g.method,
                r.seed,
                g.start_density,
                g.final_density,
                g.update_interval,
                g.prune_start,
                g.prune_end,
                g.regrow_fraction,
                r.status,
                r.epoch,
                r.train.epochs,
                r.accuracy,
                r.density,
                r.inference_flops,
                r.training_flops,
                r.checkpoint,
                r.error,
            ]
        )
    return out.getvalue().encode()
