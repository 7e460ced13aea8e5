"""Loading side: verify data files against the manifest, then decode tensors from Arrow.

Every file is checked for size and sha256 before Arrow parses it; every record batch is
checked against the manifest's schema, row name and value count; every CSR pattern is checked
to be well formed. Nothing here unpickles anything. Hashing, decompression and scattering run
on a small thread pool (hashlib, Arrow and numpy release the GIL).
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import Executor

import numpy as np
import pyarrow as pa
import torch

from granet_ray.store.codec import (
    BatchView,
    array_to_tensor,
    dtype_name,
    mask_from_positions,
    open_file,
    positions_from_pattern,
    read_batch,
    scatter,
    sparse_csr,
    tensor_to_array,
)
from granet_ray.store.errors import (
    ChecksumMismatchError,
    MissingFileError,
    SchemaMismatchError,
    TruncatedFileError,
)
from granet_ray.store.format import CSR, MANIFEST_NAME, csr_schema, values_schema
from granet_ray.store.manifest import Manifest, TensorEntry
from granet_ray.store.storage import Storage


def _verify(where: str, data: bytes | None, size: int, sha256: str) -> bytes:
    if data is None:
        raise MissingFileError(f"{where} is missing (listed in {MANIFEST_NAME})")
    if len(data) != size:
        state = "truncated" if len(data) < size else "longer than listed"
        raise TruncatedFileError(
            f"{where} is {state}: {len(data)} bytes read, {MANIFEST_NAME} lists {size}"
        )
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ChecksumMismatchError(
            f"{where}: sha256 differs from {MANIFEST_NAME} (file corrupted or replaced)"
        )
    return data


def read_verified(storage: Storage, manifest: Manifest, pool: Executor) -> dict[str, bytes]:
    """The bytes of every file the manifest lists, after checking size and sha256."""
    contents = storage.get_many({name: f.bytes + 1 for name, f in manifest.files.items()})
    names = list(contents)
    checked = pool.map(
        lambda name: _verify(
            f"{storage.uri}/{name}",
            contents[name],
            manifest.files[name].bytes,
            manifest.files[name].sha256,
        ),
        names,
    )
    return dict(zip(names, checked, strict=True))


def entry_schema(entry: TensorEntry) -> pa.Schema:
    """The Arrow schema a tensor's file must have, from its manifest data_types."""
    types = entry.data_types
    if "pointers_to_1" in types:
        return csr_schema(types["pointers_to_1"], types["indices_1"], types["values"])
    return values_schema(types["values"])


class Decoder:
    """Decodes every record batch the given entries use (in parallel, each task with its own
    Arrow reader), then tensors from their rows. After construction it only reads shared
    state, so tensors can be decoded on several threads; model tensors must be decoded
    before optimizer state that borrows their patterns."""

    def __init__(
        self, uri: str, data: dict[str, bytes], entries: list[TensorEntry], pool: Executor
    ) -> None:
        self.uri = uri
        schemas: dict[str, TensorEntry] = {}
        for entry in entries:
            first = schemas.setdefault(entry.file, entry)
            if entry.data_types != first.data_types:
                raise SchemaMismatchError(
                    f"{uri}/{entry.file}: its tensors imply different schemas in the manifest"
                )
        keys = sorted({(e.file, e.batch) for e in entries})

        def decode(key: tuple[str, int]) -> BatchView:
            file, batch = key
            where = f"{uri}/{file}"
            return read_batch(
                open_file(data[file], entry_schema(schemas[file]), where), batch, where
            )

        self.batches = dict(zip(keys, pool.map(decode, keys), strict=True))
        self.patterns: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.prepared: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}

    def _columns(self, entry: TensorEntry, label: str) -> list[np.ndarray]:
        columns = self.batches[entry.file, entry.batch].row(entry.row, label)
        if len(columns[-1]) != entry.number_of_stored_values:
            raise SchemaMismatchError(
                f"{self.uri}/{entry.file}: {label!r} stores {len(columns[-1])} values, the "
                f"manifest says {entry.number_of_stored_values}"
            )
        return columns

    def prepare(self, name: str, entry: TensorEntry) -> None:
        """Check a model tensor's row (and CSR pattern) and keep its values and positions,
        so that every check can run before anything is written into a model."""
        columns = self._columns(entry, name)
        if entry.format != CSR:
            self.prepared[name] = (columns[-1], None)
            return
        indptr, indices, values = columns
        rows, cols = entry.shape
        where = f"{self.uri}/{entry.file} ({name!r})"
        positions = positions_from_pattern(indptr, indices, rows, cols, where)
        self.patterns[name] = (indptr, indices, positions)
        self.prepared[name] = (values, positions)

    def check_optimizer(self, label: str, entry: TensorEntry) -> None:
        """Check an optimizer state tensor's row without decoding it."""
        self._columns(entry, label)

    def _values_and_positions(
        self, name: str, entry: TensorEntry
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if name not in self.prepared:
            self.prepare(name, entry)
        return self.prepared[name]

    def _tensor(
        self, entry: TensorEntry, values: np.ndarray, owner: str | None, layout: str
    ) -> torch.Tensor:
        if owner is None:
            return array_to_tensor(values.copy(), entry.dtype).view(entry.tensor_shape)
        indptr, indices, positions = self.patterns[owner]
        if layout == "csr":
            return sparse_csr(
                indptr, indices, array_to_tensor(values.copy(), entry.dtype), *entry.shape
            )
        flat = scatter(positions, values, math.prod(entry.tensor_shape))
        return array_to_tensor(flat, entry.dtype).view(entry.tensor_shape)

    def model_tensor(
        self, name: str, entry: TensorEntry, layout: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tensor, bool mask or None) of a model tensor in ``layout`` ("dense" / "csr")."""
        values, positions = self._values_and_positions(name, entry)
        if positions is None:
            return self._tensor(entry, values, None, layout), None
        mask = mask_from_positions(positions, entry.tensor_shape)
        return self._tensor(entry, values, name, layout), mask

    def load_into(self, name: str, entry: TensorEntry, target: torch.Tensor) -> torch.Tensor | None:
        """Write a model tensor into ``target`` (same shape) in place; returns its mask or None.
        A contiguous CPU target of the same dtype is written directly, without a temporary."""
        values, positions = self._values_and_positions(name, entry)
        direct = (
            target.device.type == "cpu"
            and target.is_contiguous()
            and dtype_name(target) == entry.dtype
            and entry.dtype != "bool"
        )
        if direct:
            out = tensor_to_array(target)
            if positions is None:
                out[:] = values
            else:
                out.fill(0)
                out[positions] = values
        else:
            owner = None if positions is None else name
            with torch.no_grad():
                target.copy_(self._tensor(entry, values, owner, "dense"))
        return None if positions is None else mask_from_positions(positions, entry.tensor_shape)

    def optimizer_tensor(self, label: str, entry: TensorEntry, layout: str) -> torch.Tensor:
        """An optimizer state tensor; CSR values take their weight's pattern."""
        values = self._columns(entry, label)[-1]
        return self._tensor(entry, values, entry.pattern if entry.format == CSR else None, layout)
