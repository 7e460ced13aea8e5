"""Preset files: one ``TrainConfig`` as JSON (``TrainConfig.to_dict()``), the format a sweep
exports its best configuration per sparsity level in and a grid's ``base`` may name.
No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from granet_ray.config import ConfigError, TrainConfig


def preset_file_name(final_density: float) -> str:
    """The file name of the best preset for a target density: ``best-density-0.05.json``."""
    return f"best-density-{final_density:g}.json"


def dump_preset(train: TrainConfig) -> bytes:
    """``train`` as an indented JSON preset file."""
    return (json.dumps(train.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def load_preset_file(path: str | Path) -> TrainConfig:
    """The ``TrainConfig`` of a preset file (JSON, or YAML with the same fields); raises
    ``ConfigError`` naming the file and the field when it is missing or invalid."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"preset file {path}: cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"preset file {path}: not valid JSON/YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path}: must hold a mapping of TrainConfig fields")
    try:
        return TrainConfig.from_dict(data)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"preset file {path}: {err}") from None
