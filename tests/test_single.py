"""A real single-process GraNet run: MNIST-5k (bundled, offline) at 90% sparsity."""

from __future__ import annotations

import math

from rich.console import Console

from granet_ray.config import preset
from granet_ray.single import train_single


def test_granet_reaches_high_accuracy_at_90_percent_sparsity_on_mnist5k() -> None:
    cfg = preset("mnist_demo")  # granet, ERK d_i = 0.5 -> d_f = 0.1, 8 epochs
    assert cfg.granet.final_density == 0.1
    console = Console(record=True, width=120)
    result = train_single(cfg, device="cpu", console=console)
    engine = result.engine
    total = sum(m.numel() for m in engine.masks.values())
    assert sum(int(m.sum()) for m in engine.masks.values()) == math.floor(0.1 * total + 1e-9)
    assert result.accuracy >= 0.96, f"test accuracy {result.accuracy:.4f}"
    assert result.summary["inference_flops"] < 0.5
    assert 0.1 < result.summary["training_flops"] < 0.6
    updates = engine.history
    assert updates and updates[-1]["density"] == engine.density()
    shown = console.export_text()
    assert "test accuracy" in shown and "fc1.weight" in shown
