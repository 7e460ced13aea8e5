"""GraNet sweeps on Ray Tune: the search space (``space``), early stopping per sparsity level
(``asha``), the Tuner driver (``driver``), the results as data (``results``) and the live
display (``progress``). Builds on ``granet_ray.train``.

Names are imported on first use, so the Ray-free ``space`` and ``results`` (what a dry run
needs) load without Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "sweep": "granet_ray.tune.driver",
    "SweepOutcome": "granet_ray.tune.driver",
    "driver_fn": "granet_ray.tune.driver",
    "SweepSpace": "granet_ray.tune.space",
    "TrialPoint": "granet_ray.tune.space",
    "load_space": "granet_ray.tune.space",
    "expand": "granet_ray.tune.space",
    "validate": "granet_ray.tune.space",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'granet_ray.tune' has no attribute {name!r}")
