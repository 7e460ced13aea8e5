"""GraNet sweeps on Ray Tune: search space (``space``), the Tuner driver (``driver``), results
(``results``), preset files (``presets``), the live display (``display``) and the job's flags
(``jobs``).

Names are imported on first use, so ``granet_ray.tune.presets`` (what a training job needs to
read a sweep's preset) loads without Ray.
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
    "load_preset_file": "granet_ray.tune.presets",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'granet_ray.tune' has no attribute {name!r}")
