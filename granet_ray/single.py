"""A single-process GraNet run: one device, no Ray. The same loop the Ray workers run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from granet_ray.config import TrainConfig
from granet_ray.data import build_datasets
from granet_ray.loop import (
    StepInfo,
    build_lr_schedule,
    build_optimizer,
    evaluate,
    seed_everything,
    train_epoch,
)
from granet_ray.models import build_model
from granet_ray.report import layer_table, step_status, training_progress
from granet_ray.sparsity import GraNet


@dataclass
class SingleRunResult:
    """The trained model, its engine, and the final test metrics."""

    model: nn.Module
    engine: GraNet
    accuracy: float
    loss: float
    summary: dict[str, Any]


def train_single(
    cfg: TrainConfig,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> SingleRunResult:
    """Train ``cfg`` in this process with the GraNet engine; prints a progress bar and the
    final per-layer table when ``progress``."""
    console = console or Console()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(cfg.seed)
    data = build_datasets(cfg.dataset, cfg.data_root, train_size=cfg.train_size, seed=cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(
        data.train, batch_size=cfg.batch_size, shuffle=True, generator=generator
    )
    test_loader = DataLoader(data.test, batch_size=256)
    model = build_model(cfg.model, num_classes=data.num_classes).to(device)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = build_lr_schedule(optimizer, cfg, steps_per_epoch)
    engine = GraNet(
        model,
        optimizer,
        cfg.granet,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and device.type == "cuda" else None
    shown: dict[str, Any] = {"epoch": 1, "accuracy": None}
    bar = training_progress(console, disable=not progress)

    def on_step(info: StepInfo) -> None:
        bar.update(
            task,
            advance=1,
            status=step_status(
                epoch=shown["epoch"],
                loss=info.loss,
                density=engine.density(),
                next_update=engine.next_update_step(),
                accuracy=shown["accuracy"],
            ),
        )

    with bar:
        task = bar.add_task("GraNet", total=total_steps, status="")
        for epoch in range(1, cfg.epochs + 1):
            shown["epoch"] = epoch
            train_epoch(
                model,
                train_loader,
                optimizer,
                scheduler,
                engine,
                device=device,
                label_smoothing=cfg.label_smoothing,
                scaler=scaler,
                on_step=on_step,
            )
            result = evaluate(model, test_loader, device=device, amp=scaler is not None)
            shown["accuracy"] = result.accuracy
    summary = engine.summary()
    if progress:
        console.print(layer_table(summary, title=f"{cfg.model} after {cfg.epochs} epochs"))
        console.print(
            f"test accuracy [bold]{result.accuracy:.2%}[/] at density "
            f"{engine.density():.4f} ({cfg.granet.method})"
        )
    return SingleRunResult(model, engine, result.accuracy, result.loss, summary)
