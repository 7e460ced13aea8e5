"""The data files' codec: CSR patterns from masks, and Arrow IPC tables of one row per tensor.

CSR: a >= 2-D weight is viewed as the matrix (out, in*kh*kw...). The pattern comes from the
mask, never from the values, so an active weight equal to 0.0 keeps its place. Positions are
row-major flat offsets into the matrix (int64).

Arrow IPC: every file starts with a ``name: string`` column. CSR files add list columns
``indptr``, ``indices``, ``values``; dense and pattern-values files add one list column
``values`` (a dense tensor flattened in C order). CSR and pattern-values rows get a record
batch each (their compressed size is then known exactly); dense rows share one record batch
per file. Arrays move between numpy and Arrow through their buffers (zero-copy, no pandas).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from granet_ray.store.errors import InvalidInputError, SchemaMismatchError
from granet_ray.store.format import (
    ARROW_TYPES,
    COMPRESSION,
    DTYPE_NAMES,
    MIN_COMPRESSION_GAIN,
    NUMPY_TYPES,
)

# ---------------------------------------------------------------- CSR patterns


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of the 2-D view of a >= 2-D tensor: (shape[0], prod(shape[1:]))."""
    return shape[0], math.prod(shape[1:])


def mask_positions(name: str, tensor: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Flat int64 positions (nnz,) where the mask is True, ascending.

    Raises InvalidInputError when the mask is not a bool tensor of the weight's shape or the
    weight has fewer than 2 dims.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InvalidInputError(f"mask for {name!r} must be a torch.bool tensor, got {kind}")
    if tensor.dim() < 2:
        raise InvalidInputError(
            f"mask given for {name!r} of shape {tuple(tensor.shape)}: only >= 2-D weights "
            "(Conv / Linear) can be masked"
        )
    if mask.shape != tensor.shape:
        raise InvalidInputError(
            f"mask for {name!r} has shape {tuple(mask.shape)}, the tensor has {tuple(tensor.shape)}"
        )
    return np.flatnonzero(mask.detach().cpu().numpy())


def _count_nonzero(stored: np.ndarray, dtype: str) -> int:
    if dtype == "bfloat16":  # uint16 bits: ignore the sign so that -0.0 is zero
        return int(np.count_nonzero(stored & 0x7FFF))
    return int(np.count_nonzero(stored))


def active_values(what: str, flat: np.ndarray, dtype: str, positions: np.ndarray) -> np.ndarray:
    """The stored values (nnz,) of a flat stored array at ``positions``; InvalidInputError
    naming ``what`` if any other value is non-zero (-0.0 counts as zero, NaN does not)."""
    values = flat[positions]
    outside = _count_nonzero(flat, dtype) - _count_nonzero(values, dtype)
    if outside:
        raise InvalidInputError(
            f"{what} has {outside} non-zero value(s) outside its mask; masked weights must be "
            "exactly zero where the mask is False"
        )
    return values


def pattern_arrays(positions: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``indptr`` (rows+1,) and ``indices`` (nnz,) as int64 from ascending flat positions."""
    indptr = np.searchsorted(positions, np.arange(rows + 1, dtype=np.int64) * cols)
    indices = positions - np.repeat(np.arange(rows, dtype=np.int64) * cols, np.diff(indptr))
    return indptr, indices


def positions_from_pattern(
    indptr: np.ndarray, indices: np.ndarray, rows: int, cols: int, where: str
) -> np.ndarray:
    """Flat int64 positions (nnz,) from a stored CSR pattern, after checking it is well formed:
    indptr starts at 0, never decreases, ends at nnz; indices lie in [0, cols) and strictly
    increase within each row. Raises SchemaMismatchError naming ``where`` otherwise."""
    indptr64 = indptr.astype(np.int64)
    nnz = len(indices)
    if len(indptr64) != rows + 1 or indptr64[0] != 0 or indptr64[-1] != nnz:
        raise SchemaMismatchError(
            f"{where}: indptr must have {rows + 1} entries from 0 to {nnz}, got "
            f"{len(indptr64)} entries ending at {indptr64[-1] if len(indptr64) else 'nothing'}"
        )
    counts = np.diff(indptr64)
    if (counts < 0).any():
        raise SchemaMismatchError(f"{where}: indptr decreases")
    positions = np.repeat(np.arange(rows, dtype=np.int64) * cols, counts)
    positions += indices.astype(np.int64, copy=False)
    if nnz and int(indices.max()) >= cols:
        raise SchemaMismatchError(f"{where}: column index {int(indices.max())} >= {cols}")
    if nnz > 1 and not (positions[1:] > positions[:-1]).all():
        raise SchemaMismatchError(f"{where}: column indices are not strictly increasing per row")
    return positions


def scatter(positions: np.ndarray, values: np.ndarray, numel: int) -> np.ndarray:
    """Flat array (numel,) with ``values`` at ``positions`` and zeros elsewhere (writable)."""
    out = np.zeros(numel, values.dtype)
    out[positions] = values
    return out


def mask_from_positions(positions: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Bool mask of ``shape``, True exactly at the flat ``positions``."""
    mask = np.zeros(math.prod(shape), np.bool_)
    mask[positions] = True
    return torch.from_numpy(mask).view(shape)


def sparse_csr(
    indptr: np.ndarray, indices: np.ndarray, values: torch.Tensor, rows: int, cols: int
) -> torch.Tensor:
    """A torch sparse CSR tensor (rows, cols) with int64 index arrays (already validated)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(indptr.astype(np.int64)),
            torch.from_numpy(indices.astype(np.int64)),
            values,
            size=(rows, cols),
            check_invariants=False,
        )


# ---------------------------------------------------------------- Arrow IPC files

_NUMPY_OF_ARROW = {ARROW_TYPES[name]: NUMPY_TYPES[name] for name in ARROW_TYPES}


def tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """Flat numpy view of a contiguous CPU tensor in its stored type (bfloat16 as uint16
    bits, bool as int8)."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    if flat.dtype == torch.bool:
        return flat.view(torch.int8).numpy()
    return flat.numpy()


def array_to_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    """1-D tensor of torch dtype ``dtype`` sharing a writable stored array (bool: a copy)."""
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    if dtype == "bool":
        return torch.from_numpy(array != 0)
    return torch.from_numpy(array)


def dtype_name(tensor: torch.Tensor) -> str | None:
    """The format's name of the tensor's dtype, None when it is not in the allowlist."""
    return DTYPE_NAMES.get(tensor.dtype)


@dataclass
class Row:
    """One tensor's row: its name and the arrays of the list columns after ``name``."""

    name: str
    columns: tuple[np.ndarray, ...]


def _offsets(lengths: list[int]) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.Array.from_buffers(pa.int32(), len(offsets), [None, pa.py_buffer(offsets)])


def _strings(names: list[str]) -> pa.Array:
    encoded = [n.encode() for n in names]
    offsets = _offsets([len(e) for e in encoded]).buffers()[1]
    return pa.Array.from_buffers(
        pa.string(), len(names), [None, offsets, pa.py_buffer(b"".join(encoded))]
    )


def _record_batch(schema: pa.Schema, rows: list[Row]) -> pa.RecordBatch:
    arrays = [_strings([r.name for r in rows])]
    for i, field in enumerate(list(schema)[1:]):
        dtype = _NUMPY_OF_ARROW[field.type.value_type]
        parts = [np.ascontiguousarray(r.columns[i], dtype) for r in rows]
        data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        values = pa.Array.from_buffers(field.type.value_type, len(data), [None, pa.py_buffer(data)])
        arrays.append(pa.ListArray.from_arrays(_offsets([len(p) for p in parts]), values))
    return pa.record_batch(arrays, schema=schema)


def _write(
    schema: pa.Schema, batches: list[pa.RecordBatch], codec: pa.Codec | None
) -> tuple[bytes, list[int]]:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=codec, allow_64bit=True)
    sizes = []
    with pa.ipc.new_file(sink, schema, options=options) as writer:
        for batch in batches:
            start = sink.tell()
            writer.write_batch(batch)
            sizes.append(sink.tell() - start)
    return sink.getvalue().to_pybytes(), sizes


def encode_file(schema: pa.Schema, batches: list[list[Row]]) -> tuple[bytes, list[int]]:
    """IPC file bytes and each record batch's byte count; zstd-compressed where that makes
    the file >= 1% smaller."""
    records = [_record_batch(schema, rows) for rows in batches]
    plain = _write(schema, records, None)
    packed = _write(schema, records, COMPRESSION)
    return packed if len(packed[0]) <= (1 - MIN_COMPRESSION_GAIN) * len(plain[0]) else plain


def open_file(data: bytes, schema: pa.Schema, where: str) -> pa.ipc.RecordBatchFileReader:
    """Open IPC file bytes and check the schema equals ``schema``; SchemaMismatchError if not."""
    try:
        reader = pa.ipc.open_file(pa.py_buffer(data))
    except (pa.ArrowException, OSError) as exc:
        raise SchemaMismatchError(f"{where}: not a readable Arrow IPC file ({exc})") from None
    if not reader.schema.equals(schema, check_metadata=False):
        raise SchemaMismatchError(
            f"{where}: Arrow schema is {_schema_text(reader.schema)}, the manifest implies "
            f"{_schema_text(schema)}"
        )
    return reader


def _schema_text(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in schema) + ")"


def _numpy(array: pa.Array) -> np.ndarray:
    """Read-only numpy view of a fixed-width Arrow array without nulls."""
    dtype = _NUMPY_OF_ARROW[array.type]
    data = array.buffers()[1]
    if data is None:
        return np.empty(0, dtype)
    return np.frombuffer(data, dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _string_list(array: pa.Array) -> list[str]:
    """The values of a string array without nulls, read from its buffers."""
    _, offsets_buffer, text = array.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int32, len(array) + 1, array.offset * 4)
    raw = b"" if text is None else text.to_pybytes()
    return [raw[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


@dataclass(frozen=True)
class BatchView:
    """A decoded record batch: row names, and per list column its offsets and values."""

    where: str
    index: int
    names: list[str]
    columns: list[tuple[np.ndarray, np.ndarray]]

    def row(self, row: int, name: str) -> list[np.ndarray]:
        """The arrays of row ``row`` (read-only views), checked to belong to ``name``."""
        if not 0 <= row < len(self.names):
            raise SchemaMismatchError(
                f"{self.where}: {name!r} is row {row} of batch {self.index}, which has "
                f"{len(self.names)} row(s)"
            )
        if self.names[row] != name:
            raise SchemaMismatchError(
                f"{self.where}: row {row} of batch {self.index} holds {self.names[row]!r}, "
                f"expected {name!r}"
            )
        return [values[offsets[row] : offsets[row + 1]] for offsets, values in self.columns]


def read_batch(reader: pa.ipc.RecordBatchFileReader, index: int, where: str) -> BatchView:
    """Decode record batch ``index``: checks structure and nulls; SchemaMismatchError if bad."""
    if not 0 <= index < reader.num_record_batches:
        raise SchemaMismatchError(
            f"{where}: batch {index} requested, the file has {reader.num_record_batches}"
        )
    try:
        batch = reader.get_batch(index)
        batch.validate(full=True)
    except (pa.ArrowException, OSError) as exc:
        raise SchemaMismatchError(f"{where}: batch {index} is unreadable ({exc})") from None
    if any(column.null_count for column in batch.columns):
        raise SchemaMismatchError(f"{where}: batch {index} has null entries")
    names = _string_list(batch.column(0))
    columns = []
    for column in batch.columns[1:]:
        if column.values.null_count:
            raise SchemaMismatchError(f"{where}: batch {index} has null values")
        columns.append((_numpy(column.offsets), _numpy(column.values)))
    return BatchView(where, index, names, columns)
