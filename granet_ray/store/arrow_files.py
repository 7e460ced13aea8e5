"""Arrow IPC data files: tables with one row per tensor.

Every file starts with a ``name: string`` column. CSR files add list columns ``indptr``,
``indices``, ``values``; dense and pattern-values files add one list column ``values`` (a dense
tensor flattened in C order). CSR and pattern-values rows get a record batch each (their
compressed size is then known exactly); dense rows share one record batch per file.
Arrays move between numpy and Arrow through their buffers (zero-copy, no pandas).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from granet_ray.store.errors import SchemaMismatchError
from granet_ray.store.format import (
    ARROW_TYPES,
    COMPRESSION,
    DTYPE_NAMES,
    MIN_COMPRESSION_GAIN,
    NUMPY_TYPES,
)

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
