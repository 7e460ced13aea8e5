"""What a checkpoint of a run holds besides weights and masks, and how a run resumes from one.

A checkpoint is the store's sparse format (``save_sparse``): the plain model's state dict with
the engine's masks, the optimizer state by parameter name, and JSON metadata with everything
else a run needs to continue exactly: the position (epoch, step within it, the training sums
so far), the engine state, the LR scheduler and GradScaler states, every worker's RNG states,
the per-epoch metrics and the ``TrainConfig``. A run resumes on any number of workers (the
schedule counts global steps of a fixed global batch); on the same number each worker also
gets its own RNG states back, so the result is bit for bit the uninterrupted one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from granet_ray.config import RUNTIME_FIELDS, ConfigError, TrainConfig
from granet_ray.recipe import Position, Run, Totals, seed_everything, worker_seed
from granet_ray.store import (
    CorruptCheckpointError,
    ManifestError,
    latest_checkpoint,
    load_sparse,
    optimizer_state_by_name,
    optimizer_state_from_names,
    save_sparse,
    set_aside,
)

METADATA_KIND = "granet-ray-train"
METADATA_VERSION = 2


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python ``random``, NumPy) as JSON."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by ``rng_state`` (CUDA only where it was captured)."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def checkpoint_name(position: Position, steps_per_epoch: int) -> str:
    """``checkpoint_epoch_0003`` after 3 complete epochs; ``checkpoint_epoch_0002_step_0040``
    40 steps into the third epoch (sortable by name within a run)."""
    if position.step_in_epoch == 0:
        return f"checkpoint_epoch_{position.epoch:04d}"
    width = max(4, len(str(steps_per_epoch)))
    return f"checkpoint_epoch_{position.epoch:04d}_step_{position.step_in_epoch:0{width}d}"


def checkpoint_metadata(run: Run, position: Position, rngs: list[dict[str, Any]]) -> dict:
    """The JSON metadata of a checkpoint of ``run`` at ``position``; ``rngs``: every
    worker's ``rng_state()`` by rank."""
    t = position.totals
    return {
        "kind": METADATA_KIND,
        "version": METADATA_VERSION,
        "epoch": position.epoch,
        "step_in_epoch": position.step_in_epoch,
        "step": run.engine.step_count,
        "world_size": run.world,
        "totals": [t.loss_sum, t.correct, t.count],
        "train": run.train.to_dict(),
        **run.state(),
        "summary": run.engine.summary(),
        "epochs": position.epochs,
        "resizes": run.resizes,
        "rng": rngs,
        "data_fingerprint": getattr(run.data.train, "fingerprint", None),
    }


def save_checkpoint(
    run: Run,
    position: Position,
    uri: str,
    rngs: list[dict[str, Any]],
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write the checkpoint of ``run`` at ``position`` to ``uri``; returns its URI."""
    return save_sparse(
        run.net.state_dict(),
        uri,
        masks=run.engine.masks,
        metadata=checkpoint_metadata(run, position, rngs),
        optimizer_state=optimizer_state_by_name(run.optimizer, run.net.named_parameters()),
        storage_options=storage_options,
    )


def check_resumable(
    metadata: dict[str, Any], train: TrainConfig, fingerprint: str | None = None
) -> None:
    """Raise ``ConfigError`` unless a checkpoint was written by this very run configuration
    (all ``TrainConfig`` fields but ``RUNTIME_FIELDS``), naming the fields that differ, and
    on the same packed dataset (``fingerprint``, the dataset's now: the data_root may move,
    its contents may not), naming both."""
    if metadata.get("kind") != METADATA_KIND or metadata.get("version") != METADATA_VERSION:
        raise ConfigError(
            f"the run's latest checkpoint was not written by {METADATA_KIND} "
            f"version {METADATA_VERSION}: choose a new run name"
        )
    ours = json.loads(json.dumps(train.to_dict()))
    changed = sorted(
        name for name in _diff(metadata["train"], ours) if name.split(".")[0] not in RUNTIME_FIELDS
    )
    recorded = metadata.get("data_fingerprint")
    if recorded != fingerprint:
        before = metadata["train"].get("data_root")
        raise ConfigError(
            f"data_root={train.data_root!r} ({_packed(fingerprint)}) is not the dataset the "
            f"run's latest checkpoint trained on ({before!r}, {_packed(recorded)}): resume on "
            "that dataset or choose a new run name"
        )
    if changed:
        raise ConfigError(
            f"{', '.join(changed)} differ(s) from the run's latest checkpoint: a run resumes "
            "only with the configuration it started with; choose a new run name"
        )


def _packed(fingerprint: str | None) -> str:
    return f"packed dataset {fingerprint[:16]}" if fingerprint else "not a packed dataset"


def _match_memory_format(optimizer: torch.optim.Optimizer) -> None:
    """Give every weight-shaped optimizer state its parameter's strides (loaded state is
    contiguous; a channels-last weight's momentum would otherwise stay in the other memory
    format and slow every step after a resume)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                mismatched = torch.is_tensor(value) and value.shape == param.shape
                if mismatched and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names


@dataclass(frozen=True)
class Resumed:
    """A run restored from ``checkpoint``: where to continue, the checkpoint's metadata and
    when it was saved (POSIX seconds)."""

    checkpoint: str
    position: Position
    metadata: dict[str, Any]
    saved_at: float


def restore(run: Run, uri: str, storage_options: dict[str, Any] | None = None) -> Resumed:
    """Load the checkpoint at ``uri`` into ``run`` (weights, masks, optimizer, scheduler,
    scaler, engine, resizes) and this worker's RNGs: its own states when the checkpoint was
    written by as many workers, else fresh ones from ``worker_seed(seed, rank, step)``."""
    loaded = load_sparse(
        uri, model=run.net, map_location=run.device, storage_options=storage_options
    )
    meta = loaded.metadata
    check_resumable(meta, run.train, getattr(run.data.train, "fingerprint", None))
    named = run.net.named_parameters()
    run.optimizer.load_state_dict(
        optimizer_state_from_names(loaded.optimizer_state, run.optimizer, named)
    )
    _match_memory_format(run.optimizer)
    run.scheduler.load_state_dict(meta["scheduler"])
    run.engine.load_state_dict({**meta["engine"], "masks": loaded.masks})
    if run.scaler is not None and meta["scaler"]:
        run.scaler.load_state_dict(meta["scaler"])
    run.resizes = list(meta["resizes"])
    if meta["world_size"] == run.world:
        set_rng_state(meta["rng"][run.rank])
    else:
        seed_everything(worker_seed(run.train.seed, run.rank, meta["step"]))
    loss_sum, correct, count = meta["totals"]
    totals = Totals(loss_sum, correct, count)
    position = Position(meta["epoch"], meta["step_in_epoch"], totals, list(meta["epochs"]))
    return Resumed(loaded.uri, position, meta, loaded.manifest.created_timestamp)


def resume_latest(
    run: Run, run_uri: str, storage_options: dict[str, Any] | None = None
) -> Resumed | None:
    """``restore`` ``run`` from the newest checkpoint in ``run_uri`` that loads; None when
    there is none. A checkpoint that fails verification on load (a changed file of the right
    size, a bad Arrow file) is set aside with a warning (``store.set_aside``) and the one
    before it tried, so one damaged checkpoint never stops a run for good; nothing is written
    into ``run`` before a checkpoint verifies."""
    while (uri := latest_checkpoint(run_uri, storage_options)) is not None:
        try:
            return restore(run, uri, storage_options)
        except (CorruptCheckpointError, ManifestError) as exc:
            set_aside(uri, exc, storage_options)
    return None
