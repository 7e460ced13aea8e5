"""granet-ray: GraNet sparse training on Ray Train and Tune, with Arrow CSR checkpoints.

The sparsity engine and configs import without Ray; ``fit`` and ``sweep`` import Ray when
first used, and ``save_sparse`` / ``load_sparse`` come from the checkpoint store.
"""

from __future__ import annotations

import importlib
from typing import Any

from granet_ray.config import ConfigError, GraNetConfig, TrainConfig, preset
from granet_ray.sparsity import GraNet

_LAZY = {
    "save_sparse": "granet_ray.store",
    "load_sparse": "granet_ray.store",
    "list_checkpoints": "granet_ray.store",
    "latest_checkpoint": "granet_ray.store",
    "CheckpointError": "granet_ray.store",
    "SparseCheckpoint": "granet_ray.store",
    "optimizer_state_by_name": "granet_ray.store",
    "optimizer_state_from_names": "granet_ray.store",
    "RunSettings": "granet_ray.train",
    "fit": "granet_ray.train",
    "sweep": "granet_ray.tune",
}

__all__ = ["ConfigError", "GraNet", "GraNetConfig", "TrainConfig", "preset", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'granet_ray' has no attribute {name!r}")
