"""save_sparse / load_sparse / list_checkpoints / latest_checkpoint.

Save: validate and encode everything in memory, write the data files under names unique to
this save, then commit ``manifest.json`` last; only after that are the files of a replaced
checkpoint deleted. Load: trust only the manifest; check every file's size and sha256 before
Arrow parses it; no pickle anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from granet_ray.store.decode import Decoder, read_verified
from granet_ray.store.encode import encode_checkpoint, state_tensors
from granet_ray.store.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InvalidInputError,
    ManifestError,
    ModelMismatchError,
    UnsupportedFormatError,
)
from granet_ray.store.format import CSR, MANIFEST_NAME, MAX_MANIFEST_BYTES
from granet_ray.store.manifest import (
    FileEntry,
    Manifest,
    TensorEntry,
    json_value,
    parse_manifest,
    utc_now,
)
from granet_ray.store.storage import Storage, open_storage

LAYOUTS = ("dense", "csr")
DECODE_THREADS = min(4, os.cpu_count() or 1)
# A checkpoint that failed verification is renamed to "<name>.damaged-<UTC stamp>" (set aside)
SET_ASIDE_STAMP = "%Y%m%dT%H%M%SZ"
SET_ASIDE_RE = re.compile(r"\.damaged-\d{8}T\d{6}Z(?:/|$)")
# what verification of a committed checkpoint can find wrong with it (an UnsupportedFormatError
# is not damage: another version of granet-ray may read that checkpoint)
DAMAGE = (CorruptCheckpointError, ManifestError)


@dataclass
class SparseCheckpoint:
    """A loaded checkpoint.

    state_dict: name -> tensor. layout="dense": dense tensors (with ``model``: the model's own
        tensors, now holding the checkpoint). layout="csr": each masked weight as a 2-D torch
        sparse CSR tensor of shape (out, in*kh*kw...) with int64 indices, the rest dense.
    masks: masked weight name -> bool tensor of the weight's original shape.
    metadata: the JSON metadata given to ``save_sparse``.
    optimizer_state: ``{"state": {param: {key: tensor | number}}, "param_groups": [...]}``
        (weight-shaped state laid out like its weight), None when none was saved.
    uri: the canonical URI that was read. manifest: the validated manifest.
    """

    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    uri: str
    manifest: Manifest = field(repr=False)


def _manifest_bytes(storage: Storage) -> bytes | None:
    return storage.get(MANIFEST_NAME, MAX_MANIFEST_BYTES + 1)


def manifest_data(storage: Storage) -> bytes:
    """The raw bytes of a checkpoint's manifest; CheckpointNotFoundError when there is none."""
    data = _manifest_bytes(storage)
    if data is None:
        raise CheckpointNotFoundError(
            f"no committed checkpoint at {storage.uri}: {MANIFEST_NAME} is missing"
        )
    return data


def read_manifest(storage: Storage) -> Manifest:
    """The validated manifest of a checkpoint; CheckpointNotFoundError when there is none."""
    return parse_manifest(manifest_data(storage), f"{storage.uri}/{MANIFEST_NAME}")


def save_sparse(
    state: nn.Module | Mapping[str, torch.Tensor],
    uri: str | os.PathLike[str],
    *,
    masks: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Save a model (or state dict) as a sparse checkpoint.

    The data files are written first under names unique to this save, ``manifest.json``
    last: a reader sees the whole checkpoint or none of it. Without ``overwrite``, a
    committed checkpoint at ``uri`` that fails verification (a missing, truncated or altered
    file, an unreadable manifest) is not replaced but set aside: renamed to
    ``<name>.damaged-<UTC stamp>``, with a warning (``warnings.warn``) naming both URIs; the
    save then proceeds.

    Args:
        state: the model, or its state dict (name -> tensor).
        uri: where to write: a local path, ``file://`` URI or ``s3://bucket/prefix``.
        masks: state-dict name -> bool tensor of the weight's shape, for >= 2-D float
            weights; those are stored as CSR of the mask's pattern (weights outside the mask
            must be 0).
        metadata: JSON object (step, config, engine state...) stored in the manifest.
        optimizer_state: ``{"state": {param name: {key: tensor | number}}, "param_groups":
            [...]}`` (see ``optimizer_state_by_name``); weight-shaped state of a masked weight
            is stored with that weight's pattern.
        storage_options: for s3:// URIs, passed to ``s3fs.S3FileSystem`` (key, secret,
            endpoint_url, client_kwargs, config_kwargs...).
        overwrite: replace a committed checkpoint at ``uri``; the old one stays loadable
            until the new manifest is committed.

    Returns:
        The canonical URI of the checkpoint.

    Raises:
        CheckpointExistsError: ``uri`` holds a committed, verified checkpoint and
            ``overwrite`` is False.
        InvalidInputError: bad state, masks, metadata or optimizer state; nothing is written.
        InvalidURIError: a malformed URI or storage options that do not apply.
        StorageError: the storage failed (a subclass names an unreachable S3 endpoint,
            refused credentials or a missing bucket).
    """
    storage = open_storage(uri, storage_options)
    tensors = state_tensors(state)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InvalidInputError(f"metadata must be a dict, got {type(metadata).__name__}")
    meta = json_value(dict(metadata or {}), "metadata")
    previous = _manifest_bytes(storage)
    damage = None
    if previous is not None and not overwrite:
        damage = _damage(storage, previous)
        if damage is None:
            raise CheckpointExistsError(
                f"{storage.uri} already holds a checkpoint; pass overwrite=True to replace it"
            )
    save_id = secrets.token_hex(6)
    encoded = encode_checkpoint(tensors, masks, optimizer_state, save_id)
    manifest = Manifest(
        created_at=utc_now(),
        save_id=save_id,
        files={
            name: FileEntry(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
            for name, data in encoded.files.items()
        },
        tensors=encoded.tensors,
        param_groups=encoded.param_groups,
        optimizer_state=encoded.optimizer_state,
        metadata=meta,
    )
    if damage is not None:
        _set_aside(storage, damage)
        previous = None
    storage.put_new(encoded.files)
    storage.put(MANIFEST_NAME, manifest.to_bytes())
    if previous is not None:
        _remove_replaced(storage, previous, manifest)
    return storage.uri


def _damage(storage: Storage, data: bytes) -> CheckpointError | None:
    """What is wrong with the committed checkpoint whose manifest is ``data``: its manifest,
    or a file's presence, size or sha256; None when it verifies (or is of a format another
    version of granet-ray may read)."""
    try:
        manifest = parse_manifest(data, f"{storage.uri}/{MANIFEST_NAME}")
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            read_verified(storage, manifest, pool)
    except UnsupportedFormatError:
        return None
    except DAMAGE as exc:
        return exc
    return None


def set_aside(
    uri: str | os.PathLike[str],
    damage: CheckpointError,
    storage_options: dict[str, Any] | None = None,
) -> str | None:
    """Set aside a checkpoint that failed verification, so that the run can go on without it.

    The checkpoint's folder is renamed to ``<name>.damaged-<UTC stamp>`` (never deleted;
    ``list_checkpoints`` leaves it out) and a warning (``warnings.warn``) names both URIs and
    the damage.

    Args:
        uri: the damaged checkpoint.
        damage: what verification found (shown in the warning).
        storage_options: for s3:// URIs, passed to ``s3fs.S3FileSystem``.

    Returns:
        The URI it now has, or None when it was gone (another process set it aside).

    Raises:
        InvalidURIError: a malformed URI, or a checkpoint at the root of a bucket.
        StorageError: the storage failed, or the new name is taken.
    """
    return _set_aside(open_storage(uri, storage_options), damage)


def _set_aside(storage: Storage, damage: CheckpointError) -> str | None:
    stamp = datetime.now(timezone.utc).strftime(SET_ASIDE_STAMP)
    name = storage.uri.rstrip("/").rpartition("/")[2]
    moved = storage.rename(f"{name}.damaged-{stamp}")
    if moved is None:
        return None
    warnings.warn(
        f"{storage.uri} held a damaged checkpoint ({damage}); set aside as {moved.uri}",
        stacklevel=3,
    )
    return moved.uri


def _remove_replaced(storage: Storage, previous: bytes, current: Manifest) -> None:
    """Delete the data files of the checkpoint just replaced (best effort, after commit)."""
    try:
        old = parse_manifest(previous, f"{storage.uri}/{MANIFEST_NAME} (replaced)")
        storage.delete(*(name for name in old.files if name not in current.files))
    except CheckpointError as exc:
        warnings.warn(
            f"committed {storage.uri}, but files of the replaced checkpoint remain: {exc}",
            stacklevel=3,
        )


def _check_model(model: nn.Module, manifest: Manifest, uri: str) -> dict[str, torch.Tensor]:
    targets = model.state_dict()
    missing = [n for n in targets if n not in manifest.tensors]
    unexpected = [n for n in manifest.tensors if n not in targets]
    if missing or unexpected:
        raise ModelMismatchError(
            f"{uri} does not fit the model: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in targets.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelMismatchError(f"the model's state {name!r} is not a tensor")
        if tensor.is_meta:
            raise InvalidInputError(
                f"cannot load {uri} into a model on the meta device ({name!r} has no storage): "
                "materialize the model first, e.g. model.to_empty(device='cpu')"
            )
        stored = manifest.tensors[name].tensor_shape
        if tuple(tensor.shape) != stored:
            raise ModelMismatchError(
                f"{uri}: shape mismatch for {name!r}: checkpoint {list(stored)}, model "
                f"{list(tensor.shape)}"
            )
    return targets


def _device(map_location: str | torch.device) -> torch.device:
    try:
        device = torch.device(map_location)
        torch.empty(0, device=device)  # the device exists and is usable
    except (RuntimeError, TypeError, AssertionError) as exc:
        raise InvalidInputError(f"invalid map_location {map_location!r}: {exc}") from None
    if device.type == "meta":
        raise InvalidInputError(
            f"invalid map_location {map_location!r}: meta tensors hold no data to load into"
        )
    return device


def load_sparse(
    uri: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    layout: str = "dense",
    map_location: str | torch.device = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> SparseCheckpoint:
    """Load a checkpoint: tensors, masks, metadata and optimizer state.

    Only the manifest is trusted: every file's size and sha256 are checked before Arrow
    parses it, and every check passes before anything is written into ``model``.

    Args:
        uri: the checkpoint: a local path, ``file://`` URI or ``s3://bucket/prefix``.
        model: load the weights into it, in place (strict: every key and shape must match).
            The returned state_dict is then the model's own. Its tensors must have storage
            (not on the meta device).
        layout: "dense" or "csr" (masked weights as 2-D sparse CSR tensors
            (out, in*kh*kw...)); "csr" cannot be combined with ``model``.
        map_location: device of the returned tensors, masks and optimizer state.
        storage_options: for s3:// URIs, passed to ``s3fs.S3FileSystem``.

    Returns:
        A ``SparseCheckpoint``: state_dict, masks, metadata, optimizer_state, uri, manifest.

    Raises:
        CheckpointNotFoundError: no committed checkpoint at ``uri`` (``manifest.json`` is
            missing).
        ManifestError: the manifest is not valid JSON, misses fields or names unsafe files.
        UnsupportedFormatError: an unknown format version, tensor format or dtype.
        CorruptCheckpointError: a data file is missing (MissingFileError), has the wrong
            size (TruncatedFileError), checksum (ChecksumMismatchError) or content
            (SchemaMismatchError).
        ModelMismatchError: missing / unexpected keys or a shape mismatch with ``model``,
            naming the tensor and both shapes; nothing is written into the model then.
        InvalidInputError: a bad ``layout``, ``model`` or ``map_location``, or a model on the
            meta device.
        InvalidURIError: a malformed URI or storage options that do not apply.
        StorageError: the storage failed (a subclass names an unreachable S3 endpoint,
            refused credentials or a missing bucket).
    """
    if layout not in LAYOUTS:
        raise InvalidInputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be an nn.Module, got {type(model).__name__}")
    if layout == "csr" and model is not None:
        raise InvalidInputError("layout='csr' cannot be combined with model; use 'dense'")
    device = _device(map_location)
    storage = open_storage(uri, storage_options)
    manifest = read_manifest(storage)
    targets = _check_model(model, manifest, storage.uri) if model is not None else None
    optimizer_entries = {
        f"optimizer/{param}/{key}": value
        for param, items in (manifest.optimizer_state or {}).items()
        for key, value in items.items()
        if isinstance(value, TensorEntry)
    }
    # CSR weights carry the work: check and decode them in parallel, the small rest in line
    csr = [name for name, entry in manifest.tensors.items() if entry.format == CSR]
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        data = read_verified(storage, manifest, pool)
        entries = [*manifest.tensors.values(), *optimizer_entries.values()]
        decoder = Decoder(storage.uri, data, entries, pool)
        # every check passes before anything is written into the model
        list(pool.map(lambda name: decoder.prepare(name, manifest.tensors[name]), csr))
        for name, entry in manifest.tensors.items():
            if entry.format != CSR:
                decoder.prepare(name, entry)
        for label, entry in optimizer_entries.items():
            decoder.check_optimizer(label, entry)

        def decode(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
            entry = manifest.tensors[name]
            if targets is not None:
                return targets[name], decoder.load_into(name, entry, targets[name])
            tensor, mask = decoder.model_tensor(name, entry, layout)
            return tensor.to(device), mask

        decoded = dict(zip(csr, pool.map(decode, csr), strict=True))
    state_dict: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for name in manifest.tensors:
        tensor, mask = decoded[name] if name in decoded else decode(name)
        state_dict[name] = tensor
        if mask is not None:
            masks[name] = mask.to(device)
    optimizer_state = None
    if manifest.optimizer_state is not None:
        optimizer_state = {
            "state": {
                param: {
                    key: decoder.optimizer_tensor(f"optimizer/{param}/{key}", v, layout).to(device)
                    if isinstance(v, TensorEntry)
                    else v
                    for key, v in items.items()
                }
                for param, items in manifest.optimizer_state.items()
            },
            "param_groups": manifest.param_groups,
        }
    return SparseCheckpoint(
        state_dict=state_dict,
        masks=masks,
        metadata=manifest.metadata,
        optimizer_state=optimizer_state,
        uri=storage.uri,
        manifest=manifest,
    )


def list_checkpoints(
    prefix: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> list[str]:
    """The committed checkpoints at or under ``prefix``, oldest first.

    Committed: a valid manifest whose files all exist with the listed sizes (checksums are
    verified on load). Checkpoints set aside as damaged (``<name>.damaged-<UTC stamp>``, see
    ``save_sparse``) are left out. Ordered by metadata "step" when every checkpoint has an
    integer one (ties by creation time), else by the manifest's creation time.

    Args:
        prefix: a run folder, or any folder above checkpoints: local path, ``file://`` URI
            or ``s3://bucket/prefix``.
        storage_options: for s3:// URIs, passed to ``s3fs.S3FileSystem``.

    Returns:
        The canonical URIs of the checkpoints; empty when there is none.

    Raises:
        InvalidURIError: a malformed URI or storage options that do not apply.
        StorageError: the storage failed (a subclass names an unreachable S3 endpoint,
            refused credentials or a missing bucket).
    """
    root = open_storage(prefix, storage_options)
    found: dict[str, dict[str, int]] = {}  # directory ('' = the prefix) -> its files' sizes
    for name, size in root.list().items():
        directory, _, base = name.rpartition("/")
        found.setdefault(directory, {})[base] = size
    found = {
        d: sizes
        for d, sizes in found.items()
        if MANIFEST_NAME in sizes and not SET_ASIDE_RE.search(d)
    }
    paths = {d: f"{d}/{MANIFEST_NAME}" if d else MANIFEST_NAME for d in found}
    contents = root.get_many({path: MAX_MANIFEST_BYTES + 1 for path in paths.values()})
    committed: list[tuple[Manifest, str]] = []
    for directory, sizes in found.items():
        data = contents[paths[directory]]
        uri = root.sub(directory).uri
        if data is None:
            continue
        try:
            manifest = parse_manifest(data, f"{uri}/{MANIFEST_NAME}")
        except CheckpointError:
            continue
        if all(sizes.get(n) == f.bytes for n, f in manifest.files.items()):
            committed.append((manifest, uri))
    steps = [m.metadata.get("step") for m, _ in committed]
    by_step = all(isinstance(s, int) and not isinstance(s, bool) for s in steps)
    committed.sort(
        key=lambda item: (
            item[0].metadata["step"] if by_step else 0,
            item[0].created_timestamp,
            item[1],
        )
    )
    return [uri for _, uri in committed]


def delete_checkpoint(
    uri: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> str:
    """Delete a checkpoint: its ``manifest.json`` first (from then on no reader takes it for
    committed, so one deleted half way is never loaded), then every other file of its folder,
    then (locally) the emptied folders. Missing files are fine.

    Args:
        uri: the checkpoint: a local path, ``file://`` URI or ``s3://bucket/prefix``.
        storage_options: for s3:// URIs, passed to ``s3fs.S3FileSystem``.

    Returns:
        The canonical URI of the deleted checkpoint.

    Raises:
        InvalidURIError: a malformed URI or storage options that do not apply.
        StorageError: the storage failed; what was not deleted yet stays.
    """
    storage = open_storage(uri, storage_options)
    storage.delete(MANIFEST_NAME)
    storage.delete(*storage.list())
    if storage.local:
        for folder, _, _ in sorted(os.walk(storage.location.path), reverse=True):
            with contextlib.suppress(OSError):  # not empty (a file written since) or gone
                os.rmdir(folder)
    return storage.uri


def latest_checkpoint(
    prefix: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> str | None:
    """The newest committed checkpoint at or under ``prefix``: the last of
    ``list_checkpoints``.

    Args:
        prefix: a run folder, or any folder above checkpoints: local path, ``file://`` URI
            or ``s3://bucket/prefix``.
        storage_options: for s3:// URIs, passed to ``s3fs.S3FileSystem``.

    Returns:
        Its canonical URI, or None when there is none.

    Raises:
        InvalidURIError: a malformed URI or storage options that do not apply.
        StorageError: the storage failed (as for ``list_checkpoints``).
    """
    found = list_checkpoints(prefix, storage_options)
    return found[-1] if found else None
