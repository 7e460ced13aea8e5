"""What a person sees: the progress rows and events, the tables, the plots, and output to a
pipe that is not cut to 80 columns."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace

from rich.console import Console

from granet_ray.events import EpochEnded, Resized, Started, Stepped
from granet_ray.ui.plots import pareto_plot, training_plot
from granet_ray.ui.progress import RunView, epoch_line, step_status
from granet_ray.ui.tables import layer_table

METRICS = {
    "epoch": 2,
    "step": 64,
    "train_loss": 0.2,
    "train_accuracy": 0.95,
    "val_loss": 0.3,
    "val_accuracy": 0.932,
    "density": 0.15,
    "inference_flops": 0.2,
    "samples_per_second": 250.0,
    "next_update": -1,
}


def test_epoch_line_and_step_status() -> None:
    line = epoch_line(METRICS)
    assert "epoch   2 step      64" in line and "val loss 0.3000 acc 93.20%" in line
    status = step_status(epoch=1, loss=0.5, density=0.3, next_update=40, accuracy=None)
    assert status == "epoch 1 | loss 0.5000 | density 0.3000 | next update 40"
    assert "masks final" in step_status(epoch=1, loss=1, density=1, next_update=None, accuracy=0.5)


def test_run_view_draws_every_kind_of_event() -> None:
    out = io.StringIO()
    start = Started(
        epoch=0,
        epochs=3,
        step=0,
        steps_per_epoch=8,
        total_steps=24,
        global_batch=32,
        world_size=2,
        checkpoint=None,
    )
    with RunView(Console(file=out, width=200)) as view:
        assert not view.started
        view.show(start)
        assert view.started
        view.show(Stepped(epoch=1, step=3, loss=1.0, density=0.5, next_update=4))
        view.show(EpochEnded(METRICS))
        view.show(replace(start, epoch=1, step=8, world_size=1, checkpoint="/r/ck[1]"))
        view.show(Resized(step=8, old_size=2, new_size=1, checkpoint="/r/ck", seconds_lost=12.3))
    shown = out.getvalue()
    assert "training on 2 worker(s): 3 epochs of 8 steps of 32 samples" in shown
    assert "epoch   2 step      64" in shown
    assert "resumed on 1 worker(s) from /r/ck[1] (epoch 1, step 8)" in shown
    assert "resized from 2 to 1 worker(s) at step 8: resumed from /r/ck, 12 s lost" in shown


def test_layer_table_totals() -> None:
    summary = {
        "density": 0.25,
        "inference_flops": 0.3,
        "training_flops": 0.5,
        "layers": [
            {"name": "a.weight", "shape": [4, 4], "density": 0.25, "prunable": True, "flops": 64.0},
            {"name": "b.weight", "shape": [2, 2], "density": 1.0, "prunable": False, "flops": None},
        ],
    }
    out = io.StringIO()
    Console(file=out, width=200).print(layer_table(summary))
    shown = out.getvalue()
    assert "b.weight (dense)" in shown and "inference FLOPs 0.3000x dense" in shown
    assert "20" in shown and "0.4000" in shown  # 16 + 4 weights, 8 active


def test_plots_are_pngs() -> None:
    history = [{"step": 20, "density": 0.3}, {"step": 40, "density": 0.1}]
    epochs = [
        {"step": 32, "density": 0.3, "val_accuracy": 0.9, "train_accuracy": 0.8},
        {"step": 64, "density": 0.1, "val_accuracy": 0.95, "train_accuracy": 0.97},
    ]
    png = training_plot(history, epochs, start_density=0.5)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    pareto = pareto_plot([("a", 0.9, 0.95)], [("a", 0.9, 0.95, 0.01)], [("a", 0.9, 0.95)])
    assert pareto.startswith(b"\x89PNG")


def test_output_to_a_pipe_is_wide() -> None:
    code = (
        "from granet_ray.ui import console; from rich.table import Table; t = Table();"
        "t.add_column('x'); t.add_row('y' * 150); console().print(t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "y" * 150 in out
