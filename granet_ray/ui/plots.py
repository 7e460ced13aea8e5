"""PNG figures: a run's density and accuracy over training, a sweep's accuracy against
sparsity. No Ray; each returns PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def training_plot(
    history: list[dict[str, Any]],
    epochs: list[dict[str, Any]],
    *,
    start_density: float,
    title: str = "GraNet training",
) -> bytes:
    """Density of the prunable weights (left axis, a step line through every mask update)
    and validation / training accuracy per epoch (right axis), both over optimizer steps.

    ``history``: the engine's per-update statistics (``step``, ``density``); ``epochs``: the
    per-epoch metrics (``step``, ``density``, ``val_accuracy``, ``train_accuracy``).
    """
    points = sorted(
        [(0, start_density)]
        + [(u["step"], u["density"]) for u in history]
        + [(e["step"], e["density"]) for e in epochs]
    )
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    left = figure.add_subplot()
    left.plot(
        [s for s, _ in points],
        [d for _, d in points],
        drawstyle="steps-post",
        color="tab:blue",
        label="density",
    )
    left.set_xlabel("optimizer step")
    left.set_ylabel("density (fraction of weights kept)", color="tab:blue")
    left.set_ylim(0, 1.05)
    right = left.twinx()
    steps = [e["step"] for e in epochs]
    right.plot(steps, [e["val_accuracy"] for e in epochs], "o-", color="tab:red", label="val")
    right.plot(
        steps, [e["train_accuracy"] for e in epochs], "s--", color="tab:orange", label="train"
    )
    right.set_ylabel("accuracy", color="tab:red")
    right.set_ylim(0, 1.05)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, loc="lower left")
    left.set_title(title)
    left.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def pareto_plot(
    trials: Sequence[tuple[str, float, float]],
    means: Sequence[tuple[str, float, float, float]],
    front: Sequence[tuple[str, float, float]],
    *,
    stopped: Sequence[tuple[str, float, float]] = (),
    title: str = "Accuracy against sparsity",
) -> bytes:
    """Validation accuracy against sparsity (1 - density), one colour per variant, each
    variant drawn slightly to the side of the others so that points at the same sparsity
    stay apart.

    ``trials``: (variant, sparsity, accuracy) of every trial that ran all its epochs, small
    dots; ``means``: (variant, sparsity, mean accuracy, std) per configuration over seeds,
    markers with error bars; ``front``: (variant, sparsity, mean accuracy) of the means on the
    Pareto front by sparsity, a dashed step line with rings; ``stopped``: trials stopped
    early, grey crosses.
    """
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    variants = list(dict.fromkeys(v for v, *_ in [*means, *trials, *stopped]))
    xs = sorted({round(s, 3) for _, s, *_ in [*means, *trials, *stopped]})  # the levels
    gap = min((b - a for a, b in zip(xs, xs[1:], strict=False)), default=0.01)
    step = 100 * gap * 0.5 / max(len(variants), 1)  # percentage points between variants

    def x(variant: str, sparsity: float) -> float:
        return 100 * sparsity + (variants.index(variant) - (len(variants) - 1) / 2) * step

    for i, variant in enumerate(variants):
        color = f"C{i % 10}"
        dots = [(s, a) for v, s, a in trials if v == variant]
        axes.scatter(
            [x(variant, s) for s, _ in dots],
            [a for _, a in dots],
            s=12,
            alpha=0.35,
            color=color,
        )
        rows = [(s, m, sd) for v, s, m, sd in means if v == variant]
        axes.errorbar(
            [x(variant, s) for s, *_ in rows],
            [m for _, m, _ in rows],
            yerr=[sd for *_, sd in rows],
            fmt="o",
            capsize=3,
            color=color,
            label=variant,
        )
    if stopped:
        axes.scatter(
            [x(v, s) for v, s, _ in stopped],
            [a for *_, a in stopped],
            marker="x",
            color="grey",
            label="stopped early (ASHA)",
        )
    if front:
        fx, fy = [x(v, s) for v, s, _ in front], [a for *_, a in front]
        axes.plot(fx, fy, "--", drawstyle="steps-post", color="black", lw=1)
        axes.scatter(fx, fy, s=160, facecolors="none", edgecolors="black", label="Pareto front")
    axes.set_xlabel("sparsity (% of prunable weights removed)")
    axes.set_ylabel("validation accuracy")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
