"""What a checkpoint holds, from its manifest: per-tensor density and stored bytes, after
checking every data file against the manifest (size and sha256) unless told not to."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from granet_ray.store.api import DECODE_THREADS, manifest_data
from granet_ray.store.decode import read_verified
from granet_ray.store.format import MANIFEST_NAME, TORCH_DTYPES
from granet_ray.store.manifest import TensorEntry, parse_manifest
from granet_ray.store.storage import open_storage


@dataclass(frozen=True)
class TensorSummary:
    """One model tensor. density: stored values / elements (1.0 for dense tensors);
    bytes: its record batch in the data file; dense_bytes: numel * element size."""

    name: str
    shape: tuple[int, ...]
    format: str
    dtype: str
    density: float
    bytes: int
    dense_bytes: int


@dataclass(frozen=True)
class CheckpointSummary:
    """A checkpoint's tensors and totals, in bytes. total_bytes: every data file plus the
    manifest; optimizer_bytes: the optimizer state's share of the data files."""

    uri: str
    tensors: list[TensorSummary]
    total_bytes: int
    dense_bytes: int
    optimizer_bytes: int
    file_count: int
    metadata: dict[str, Any]


def _element_size(dtype: str) -> int:
    return torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()


def summarize(
    uri: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    verify: bool = True,
) -> CheckpointSummary:
    """Summarize a committed checkpoint from its manifest.

    verify: first read every data file and check its byte size and sha256 against the manifest,
        as ``load_sparse`` does (MissingFileError, TruncatedFileError, ChecksumMismatchError);
        False reads the manifest only.
    """
    storage = open_storage(uri, storage_options)
    data = manifest_data(storage)
    manifest = parse_manifest(data, f"{storage.uri}/{MANIFEST_NAME}")
    if verify:
        with ThreadPoolExecutor(DECODE_THREADS) as pool:
            read_verified(storage, manifest, pool)
    tensors = []
    for name, entry in manifest.tensors.items():
        numel = math.prod(entry.tensor_shape)
        tensors.append(
            TensorSummary(
                name=name,
                shape=entry.tensor_shape,
                format=entry.format,
                dtype=entry.dtype,
                density=entry.number_of_stored_values / numel if numel else 1.0,
                bytes=entry.bytes,
                dense_bytes=numel * _element_size(entry.dtype),
            )
        )
    optimizer_bytes = sum(
        value.bytes
        for state in (manifest.optimizer_state or {}).values()
        for value in state.values()
        if isinstance(value, TensorEntry)
    )
    return CheckpointSummary(
        uri=storage.uri,
        tensors=tensors,
        total_bytes=sum(f.bytes for f in manifest.files.values()) + len(data),
        dense_bytes=sum(t.dense_bytes for t in tensors),
        optimizer_bytes=optimizer_bytes,
        file_count=len(manifest.files) + 1,
        metadata=manifest.metadata,
    )
