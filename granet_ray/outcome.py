"""What a finished run leaves behind, wherever it ran: beside its checkpoints in the run's
folder ``history.json`` (per-update statistics, per-epoch metrics, resizes) and the plot
``training.png``, a ``FitOutcome`` with the headline numbers; and the final check that its
checkpoint loads back into a fresh model and keeps its accuracy."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch.utils.data import DataLoader

from granet_ray.config import RunSettings, TrainConfig
from granet_ray.data import StreamOptions, build_datasets
from granet_ray.events import FitOutcome
from granet_ray.models import build_model
from granet_ray.recipe import evaluate_model
from granet_ray.store import load_sparse, open_storage
from granet_ray.store.summary import summarize
from granet_ray.ui.plots import training_plot

PLOT_NAME = "training.png"
HISTORY_NAME = "history.json"


def finish(train: TrainConfig, run: RunSettings, checkpoint_uri: str) -> FitOutcome:
    """Read the final checkpoint's metadata, write ``history.json`` and the plot into the
    run's folder, and collect the outcome."""
    checkpoint = summarize(checkpoint_uri, run.storage_options, verify=False)
    meta = checkpoint.metadata
    history = meta["engine"]["history"]
    resizes = meta.get("resizes", [])
    folder = open_storage(run.run_uri, run.storage_options)
    record = {"updates": history, "epochs": meta["epochs"], "resizes": resizes}
    folder.put(HISTORY_NAME, json.dumps(record).encode())
    title = f"{train.model} / {train.dataset}: {train.granet.method}"
    plot = training_plot(
        history, meta["epochs"], start_density=train.granet.start_density, title=title
    )
    folder.put(PLOT_NAME, plot)
    return FitOutcome(
        name=run.name or "",
        metrics=dict(meta["epochs"][-1]),
        checkpoint_uri=checkpoint.uri,
        checkpoint_bytes=checkpoint.total_bytes,
        summary=meta["summary"],
        history=history,
        epochs=meta["epochs"],
        resizes=resizes,
        run_uri=run.run_uri,
        plot_uri=f"{run.run_uri}/{PLOT_NAME}",
    )


def evaluate_checkpoint(
    uri: str,
    train: TrainConfig,
    storage_options: dict[str, Any] | None = None,
    stream: StreamOptions | None = None,
) -> tuple[float, float]:
    """(test accuracy, density of the masked weights) of the sparse model in the checkpoint
    at ``uri``, loaded with ``load_sparse`` into a fresh ``train.model`` in this process
    (a packed ``data_root`` read as ``stream`` says)."""
    data = build_datasets(train.dataset, train.data_root, seed=train.seed, stream=stream)
    model = build_model(train.model, num_classes=data.num_classes)
    checkpoint = load_sparse(uri, model=model, storage_options=storage_options)
    loader = DataLoader(data.test, batch_size=256)
    result = evaluate_model(model, loader, device=torch.device("cpu"))
    masks = checkpoint.masks.values()
    density = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    return result.accuracy, density
