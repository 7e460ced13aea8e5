"""Checkpoint retention: which committed checkpoints of a run to delete after a save, and
deleting them through the store.

A run keeps its newest ``keep_checkpoints`` committed checkpoints and, with ``keep_best``,
the epoch-end checkpoint best by that metric. The newest committed checkpoint (the one a
resume starts from) is always kept, a save is only pruned after it committed, and only
checkpoints named by this package (``checkpoint_epoch_...``) are ever deleted. A failed
delete is a warning: the checkpoint stays and the next save tries again.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from granet_ray.config import KEEP_BEST_METRICS, RunSettings
from granet_ray.store import CheckpointError, delete_checkpoint, list_checkpoints

# resume.checkpoint_name: "checkpoint_epoch_0003" (epoch end), "..._step_0040" (mid-epoch)
CHECKPOINT_NAME_RE = re.compile(r"^checkpoint_epoch_(\d+)(_step_\d+)?$")


def _base(uri: str) -> str:
    return uri.rstrip("/").rpartition("/")[2]


def best_checkpoint(
    checkpoints: Sequence[str], metric: str, epochs: Sequence[Mapping[str, Any]]
) -> str | None:
    """The epoch-end checkpoint of ``checkpoints`` whose epoch is best by ``metric`` (a key
    of ``KEEP_BEST_METRICS``) in ``epochs`` (the run's ``EpochMetrics``, ``epoch`` 1-based);
    the newest of equals; None when no epoch-end checkpoint has a finite value."""
    at_end: dict[int, str] = {}
    for uri in checkpoints:
        match = CHECKPOINT_NAME_RE.match(_base(uri))
        if match and match.group(2) is None:
            at_end[int(match.group(1))] = uri
    sign = 1.0 if KEEP_BEST_METRICS[metric] == "max" else -1.0
    scored = [
        (sign * float(m[metric]), int(m["epoch"]))
        for m in epochs
        if int(m.get("epoch", -1)) in at_end
        and isinstance(m.get(metric), (int, float))
        and math.isfinite(m[metric])
    ]
    return at_end[max(scored)[1]] if scored else None


def to_delete(
    checkpoints: Sequence[str],
    keep: int,
    best: str | None = None,
    epochs: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """The checkpoints to delete, oldest first.

    Args:
        checkpoints: the run's committed checkpoints, oldest first (``list_checkpoints``).
        keep: how many of the newest to keep (>= 1: the newest is always kept).
        best: also keep the epoch-end checkpoint best by this metric (None: none).
        epochs: the run's metrics of its completed epochs (for ``best``).

    Returns:
        The URIs of the other checkpoints named like this package's
        (``checkpoint_epoch_NNNN[_step_NNNN]``); any other folder is never deleted.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    kept = set(checkpoints[-keep:])
    if best is not None:
        chosen = best_checkpoint(checkpoints, best, epochs)
        if chosen is not None:
            kept.add(chosen)
    return [u for u in checkpoints if u not in kept and CHECKPOINT_NAME_RE.match(_base(u))]


def apply_retention(settings: RunSettings, epochs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Delete the checkpoints of ``settings``' run folder that ``settings.keep_checkpoints``
    and ``keep_best`` do not keep; call it after a save committed, from the process that
    writes the run's checkpoints. A listing or delete that fails is a warning, never an
    error. Returns the URIs deleted."""
    if settings.keep_checkpoints is None:
        return []
    options = settings.storage_options
    try:
        found = list_checkpoints(settings.run_uri, options)
    except CheckpointError as exc:
        warnings.warn(f"checkpoint retention skipped this time: {exc}", stacklevel=2)
        return []
    deleted = []
    for uri in to_delete(found, settings.keep_checkpoints, settings.keep_best, epochs):
        try:
            delete_checkpoint(uri, options)
        except CheckpointError as exc:
            warnings.warn(f"could not delete the old checkpoint {uri}: {exc}", stacklevel=2)
            continue
        deleted.append(uri)
    return deleted
