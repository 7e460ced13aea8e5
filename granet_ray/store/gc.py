"""Orphaned checkpoint data: files no committed manifest references.

A save killed before it committed its manifest, or a checkpoint deleted half way (manifest
first), leaves data files (``<tensors>.<save id>.arrow``) that no reader ever looks at. An
orphan here is such a data file under a run's folder that is not listed by the committed
manifest beside it, and older than an age threshold, so that the files of a save still in
flight are never taken. Folders set aside as damaged, and every file that is not a
checkpoint data file (Ray's and Tune's state, TensorBoard events, the lease), are never
touched.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

from granet_ray.store.api import SET_ASIDE_RE
from granet_ray.store.errors import CheckpointError
from granet_ray.store.format import DATA_FILE_RE, MANIFEST_NAME, MAX_MANIFEST_BYTES
from granet_ray.store.manifest import parse_manifest
from granet_ray.store.storage import open_storage

# A save in flight is younger than this when a resumed run cleans up (the run holds its
# folder's lease, so only a save of a process that died can be left).
RESUME_MIN_AGE_S = 300.0


@dataclass(frozen=True)
class Orphan:
    """A data file no committed manifest references: its ``name`` under the run folder,
    ``size`` in bytes and ``age_s`` (seconds since it was last written)."""

    name: str
    size: int
    age_s: float


def find_orphans(
    run_uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    min_age_s: float,
    now: float | None = None,
) -> list[Orphan]:
    """The orphaned data files under ``run_uri`` at least ``min_age_s`` seconds old.

    Raises:
        InvalidURIError: a malformed URI or storage options that do not apply.
        StorageError: the storage failed.
    """
    storage = open_storage(run_uri, storage_options)
    now = time.time() if now is None else now
    by_folder: dict[str, dict[str, tuple[int, float]]] = {}
    for name, stat in storage.list_times().items():
        folder, _, base = name.rpartition("/")
        if not SET_ASIDE_RE.search(f"{folder}/"):
            by_folder.setdefault(folder, {})[base] = stat
    orphans = []
    for folder, files in sorted(by_folder.items()):
        data = [b for b in files if DATA_FILE_RE.match(b)]
        if not data:
            continue
        referenced = _referenced(storage.sub(folder)) if MANIFEST_NAME in files else set()
        for base in data:
            size, modified = files[base]
            if base not in referenced and now - modified >= min_age_s:
                name = f"{folder}/{base}" if folder else base
                orphans.append(Orphan(name, size, max(0.0, now - modified)))
    return orphans


def _referenced(folder: Any) -> set[str]:
    """The files a folder's manifest lists; every data file of the folder when the manifest
    cannot be read (a damaged checkpoint is set aside by a resume, never collected)."""
    raw = folder.get(MANIFEST_NAME, MAX_MANIFEST_BYTES + 1)
    if raw is None:  # deleted since the listing: its files are orphans from now on
        return set()
    try:
        return set(parse_manifest(raw, f"{folder.uri}/{MANIFEST_NAME}").files)
    except CheckpointError:
        return {name for name in folder.list() if DATA_FILE_RE.match(name.rpartition("/")[2])}


def collect_orphans(
    run_uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    min_age_s: float,
    orphans: list[Orphan] | None = None,
) -> list[Orphan]:
    """Delete the orphans of ``find_orphans`` (or the ``orphans`` given), then, locally, the
    checkpoint folders they leave empty. Returns what was deleted.

    Raises:
        StorageError: the storage failed; what was not deleted yet stays.
    """
    storage = open_storage(run_uri, storage_options)
    if orphans is None:
        orphans = find_orphans(run_uri, storage_options, min_age_s=min_age_s)
    storage.delete(*(o.name for o in orphans))
    if storage.local:
        folders = {o.name.rpartition("/")[0] for o in orphans} - {""}
        for folder in sorted(folders, reverse=True):
            with contextlib.suppress(OSError):  # not empty
                os.rmdir(os.path.join(storage.location.path, *folder.split("/")))
    return orphans
