"""granet-ray: GraNet sparse training on Ray Train and Tune, with Arrow CSR checkpoints.

The public API: the engine (``GraNet``) and its configs, the paper's presets, the sparse
checkpoint store, and ``fit`` / ``sweep`` on Ray. Importing the package loads no Ray:
``fit`` and ``sweep`` import it when first used. Everything else stays importable from its
module (``granet_ray.recipe``, ``granet_ray.local``, ``granet_ray.store``, ...).
"""

from __future__ import annotations

import importlib
from typing import Any

from granet_ray.config import ConfigError, GraNetConfig, RunSettings, TrainConfig, preset
from granet_ray.sparsity import GraNet
from granet_ray.store import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_sparse,
    save_sparse,
)

_RAY = {"fit": "granet_ray.train", "sweep": "granet_ray.tune"}

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GraNet",
    "GraNetConfig",
    "RunSettings",
    "TrainConfig",
    "fit",
    "latest_checkpoint",
    "list_checkpoints",
    "load_sparse",
    "preset",
    "save_sparse",
    "sweep",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    if name in _RAY:
        return getattr(importlib.import_module(_RAY[name]), name)
    raise AttributeError(f"module 'granet_ray' has no attribute {name!r}")
