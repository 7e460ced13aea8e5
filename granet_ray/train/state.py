"""What a checkpoint must hold besides weights and masks to resume a run exactly, as JSON.

Pure functions, no Ray, no I/O: RNG states as lists of ints, the checkpoint metadata, and
the check that a checkpoint belongs to the run resuming from it.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

from granet_ray.config import ConfigError, TrainConfig

METADATA_KIND = "granet-ray-train"
METADATA_VERSION = 1


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


def worker_seed(seed: int, rank: int) -> int:
    """A seed for worker ``rank``'s own random draws (data augmentation, data-loader
    processes), distinct per rank. Mask decisions never use it: the engine draws from
    generators seeded by (run seed, update, layer) alone."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def checkpoint_metadata(
    *,
    train: TrainConfig,
    epoch: int,
    world_size: int,
    engine_state: dict[str, Any],
    summary: dict[str, Any],
    epochs: list[dict[str, Any]],
    scheduler: dict[str, Any],
    scaler: dict[str, Any] | None,
    rng: list[dict[str, Any]],
) -> dict[str, Any]:
    """The JSON metadata of a training checkpoint taken after ``epoch`` completed epochs.

    ``engine_state`` is ``GraNet.state_dict()`` (its masks are left out: they are the
    checkpoint's masks); ``epochs`` the per-epoch metrics so far; ``rng`` one entry per
    worker rank.
    """
    engine = {k: v for k, v in engine_state.items() if k != "masks"}
    return {
        "kind": METADATA_KIND,
        "version": METADATA_VERSION,
        "epoch": epoch,
        "step": engine["step"],
        "world_size": world_size,
        "train": train.to_dict(),
        "engine": engine,
        "summary": summary,
        "epochs": epochs,
        "scheduler": scheduler,
        "scaler": scaler,
        "rng": rng,
    }


def check_resumable(metadata: dict[str, Any], train: TrainConfig, world_size: int) -> None:
    """Raise ``ConfigError`` unless a checkpoint was written by this very run configuration:
    the same ``TrainConfig`` and number of workers (so the step schedule is the same)."""
    if metadata.get("kind") != METADATA_KIND or metadata.get("version") != METADATA_VERSION:
        raise ConfigError(
            f"the run's latest checkpoint was not written by {METADATA_KIND} "
            f"version {METADATA_VERSION}: choose a new run name"
        )
    if metadata["world_size"] != world_size:
        raise ConfigError(
            f"num_workers={world_size} is invalid: the run's latest checkpoint was written by "
            f"{metadata['world_size']} workers; resume with the same count or choose a new name"
        )
    ours = json.loads(json.dumps(train.to_dict()))
    theirs = metadata["train"]
    changed = sorted(_diff(theirs, ours))
    if changed:
        raise ConfigError(
            f"{', '.join(changed)} differ(s) from the run's latest checkpoint: a run resumes "
            "only with the configuration it started with; choose a new run name"
        )


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            names.append(f"{prefix}{key}")
    return names
