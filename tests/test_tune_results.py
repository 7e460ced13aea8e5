"""Sweep results without Ray: means over seeds, the Pareto front, the best preset per
sparsity level and the files written from them (CSV, Markdown, PNG, preset JSON)."""

from __future__ import annotations

import csv
import io

import pytest
from rich.console import Console

from granet_ray.config import preset
from granet_ray.tune.results import (
    CSV_COLUMNS,
    TrialRow,
    analyze,
    best_per_density,
    comparison_markdown,
    group_trials,
    pareto_front,
    pareto_png,
    summary_markdown,
    trials_csv,
)
from granet_ray.tune.tables import groups_table, trials_table

BASE = preset("mnist_demo").replace(epochs=3, lr_milestones=(2,), granet={"prune_end": 1.5})


def _row(variant: str, density: float, seed: int, accuracy: float, **kw: object) -> TrialRow:
    method = "rigl" if variant == "rigl" else "granet"
    train = BASE.replace(seed=seed, granet={"method": method, "final_density": density})
    group = f"{variant}_df{density:g}"
    fields = {
        "status": "finished",
        "epoch": 3,
        "accuracy": accuracy,
        "density": density,
        "inference_flops": density,
        "training_flops": 2 * density,
        "checkpoint": f"/runs/{group}_s{seed}/checkpoint_epoch_0003",
    }
    fields.update(kw)
    return TrialRow(f"{group}_s{seed}", group, variant, seed, train, **fields)  # type: ignore[arg-type]


ROWS = [
    _row("granet", 0.1, 0, 0.96),
    _row("granet", 0.1, 1, 0.94),
    _row("rigl", 0.1, 0, 0.97),
    _row("rigl", 0.1, 1, 0.95),
    _row("granet", 0.02, 0, 0.90),
    _row("granet", 0.02, 1, 0.92),
    _row("rigl", 0.02, 0, 0.50, status="stopped", epoch=1),
    _row("rigl", 0.02, 1, 0.85),
    _row("rigl", 0.05, 0, 0.10, status="error", epoch=0, error="boom"),
]


def test_groups_average_finished_trials_over_seeds() -> None:
    groups = {g.group: g for g in group_trials(ROWS)}
    assert list(groups) == ["granet_df0.1", "rigl_df0.1", "granet_df0.02", "rigl_df0.02"]
    g = groups["granet_df0.1"]
    assert g.seeds == (0, 1) and g.accuracy_mean == pytest.approx(0.95)
    assert g.accuracy_std == pytest.approx(0.0141421, rel=1e-4)  # sample std
    assert (g.accuracy_min, g.accuracy_max) == (0.94, 0.96) and g.sparsity == pytest.approx(0.9)
    only = groups["rigl_df0.02"]  # the stopped seed is left out: it had a smaller budget
    assert only.seeds == (1,) and only.accuracy_std == 0.0 and only.accuracy_mean == 0.85
    assert g.train.seed == 0 and g.final_density == 0.1


def test_pareto_front_keeps_the_undominated_points_by_sparsity() -> None:
    points = [(0.9, 0.95), (0.9, 0.96), (0.98, 0.91), (0.95, 0.90), (0.98, 0.91), (0.8, 0.99)]
    assert pareto_front(points) == [5, 1, 2, 4]  # ties are both kept
    assert pareto_front([]) == []


def test_best_per_density_prefers_accuracy_then_fewer_training_flops() -> None:
    groups = group_trials(ROWS)
    best = best_per_density(groups)
    assert list(best) == [0.1, 0.02]
    assert best[0.1].group == "rigl_df0.1" and best[0.02].group == "granet_df0.02"
    tie = group_trials([_row("a", 0.1, 0, 0.9), _row("b", 0.1, 0, 0.9, training_flops=0.01)])
    assert best_per_density(tie)[0.1].variant == "b"


def test_analysis_tables_and_files() -> None:
    analysis = analyze(ROWS)
    assert analysis.front == ["rigl_df0.1", "granet_df0.02"]
    markdown = comparison_markdown(analysis.groups)
    assert markdown.splitlines()[:2] == [
        "| configuration | 90% sparsity | 98% sparsity |",
        "|---|---|---|",
    ]
    assert "| granet | 95.00 ± 1.41 (n=2) | **91.00 ± 1.41 (n=2)** |" in markdown
    assert "| rigl | **96.00 ± 1.41 (n=2)** | 85.00 ± 0.00 (n=1) |" in markdown
    summary = summary_markdown("sweep-x", ROWS, analysis)
    assert "9 trials: 7 finished, 1 stopped, 1 error." in summary
    assert "Pareto front (sparsity, mean accuracy): rigl_df0.1 (90.00%, 96.00%)" in summary
    assert "0.1: rigl_df0.1, 0.02: granet_df0.02" in summary

    table = list(csv.DictReader(io.StringIO(trials_csv(ROWS).decode())))
    assert tuple(table[0]) == CSV_COLUMNS and len(table) == len(ROWS)
    assert table[6]["status"] == "stopped" and table[6]["epoch"] == "1"
    assert table[8]["error"] == "boom" and table[2]["method"] == "rigl"
    assert table[2]["start_density"] == "0.1"  # rigl starts at its final density

    assert pareto_png(ROWS, analysis, title="t").startswith(b"\x89PNG")
    console = Console(record=True, width=200)
    console.print(trials_table(ROWS))
    console.print(groups_table(analysis.groups, front=analysis.front, best=["rigl_df0.1"]))
    shown = console.export_text()
    assert "7 finished, 1 stopped, 1 error" in shown
    assert "95.00% ± 1.41%" in shown and "Pareto preset" in shown
