"""``manifest.json``: the only file a reader trusts. Building it, and validating one that is read.

A manifest lists every data file (byte size, sha256), and every tensor with a binsparse-style
descriptor (format, shape, data_types, number_of_stored_values) plus its torch dtype and shape
and where its record batch lives. Validation rejects anything outside the format's allowlists.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from granet_ray.store.errors import InvalidInputError, ManifestError, UnsupportedFormatError
from granet_ray.store.format import (
    CSR,
    DATA_FILE_RE,
    DENSE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_TYPES,
    MASKED_DTYPES,
    MAX_MANIFEST_BYTES,
    STORED_TYPE,
    TORCH_DTYPES,
)

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
MAX_NAME_CHARS = 1024
MAX_NUMEL = 2**48
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SAVE_ID_RE = re.compile(r"^[0-9a-f]{12}$")
CSR_KEYS = ("pointers_to_1", "indices_1", "values")


def utc_now() -> str:
    """The current UTC time in the manifest's ``created_at`` format."""
    return datetime.now(timezone.utc).strftime(TIME_FORMAT)


@dataclass(frozen=True)
class FileEntry:
    """A data file: its byte size and lowercase hex sha256."""

    bytes: int
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor.

    format: CSR or DENSE. shape: binsparse shape, (rows, cols) for CSR, the tensor shape for
    DENSE. tensor_shape: the torch shape. dtype: torch dtype name. data_types: stored types by
    binsparse array name (pointers_to_1 / indices_1 / values). pattern: for CSR values that
    reuse another tensor's indptr / indices (optimizer state), that tensor's name.
    file / batch / row: where the tensor's row is. bytes: its share of the file, i.e. its
    record batch, or for a batch of several rows the batch apportioned by stored array sizes.
    """

    format: str
    shape: tuple[int, ...]
    tensor_shape: tuple[int, ...]
    dtype: str
    data_types: dict[str, str]
    number_of_stored_values: int
    file: str
    batch: int
    row: int
    bytes: int
    pattern: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to the manifest."""
        out: dict[str, Any] = {
            "format": self.format,
            "shape": list(self.shape),
            "tensor_shape": list(self.tensor_shape),
            "dtype": self.dtype,
            "data_types": dict(self.data_types),
            "number_of_stored_values": self.number_of_stored_values,
            "file": self.file,
            "batch": self.batch,
            "row": self.row,
            "bytes": self.bytes,
        }
        if self.pattern is not None:
            out["pattern"] = self.pattern
        return out


OptimizerState = dict[str, dict[str, "TensorEntry | Any"]]


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest. ``optimizer_state`` maps parameter name -> key -> a
    TensorEntry or a JSON number; None when no optimizer state was saved."""

    created_at: str
    save_id: str
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    param_groups: list[dict[str, Any]] | None
    optimizer_state: OptimizerState | None
    metadata: dict[str, Any]

    @property
    def created_timestamp(self) -> float:
        """``created_at`` as POSIX seconds."""
        parsed = datetime.strptime(self.created_at, TIME_FORMAT)
        return parsed.replace(tzinfo=timezone.utc).timestamp()

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON (``jq .`` shows it indented)."""
        optimizer = None
        if self.optimizer_state is not None:
            optimizer = {
                "param_groups": self.param_groups,
                "state": {
                    param: {
                        key: {"tensor": v.to_json()} if isinstance(v, TensorEntry) else {"value": v}
                        for key, v in state.items()
                    }
                    for param, state in self.optimizer_state.items()
                },
            }
        doc = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_at": self.created_at,
            "save_id": self.save_id,
            "files": {
                name: {"bytes": f.bytes, "sha256": f.sha256} for name, f in self.files.items()
            },
            "tensors": {name: t.to_json() for name, t in self.tensors.items()},
            "optimizer": optimizer,
            "metadata": self.metadata,
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def json_value(value: Any, where: str) -> Any:
    """A JSON-safe copy of ``value`` (tuples become lists); InvalidInputError naming the path
    of the first value that is not None, bool, int, finite float, str, list or str-keyed dict."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{where} is {value}, which JSON cannot hold")
        return value
    if isinstance(value, (list, tuple)):
        return [json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{where} has a non-string key {key!r}")
            out[key] = json_value(v, f"{where}[{key!r}]")
        return out
    raise InvalidInputError(f"{where} is a {type(value).__name__}, which is not JSON")


# ---------------------------------------------------------------- reading


def _fail(where: str, what: str) -> ManifestError:
    return ManifestError(f"{where}: {what}")


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise _fail(where, f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(where, f"field {key!r} has the wrong type ({type(value).__name__})")
    return value


def _count(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _fail(where, f"expected a non-negative integer, got {value!r}")
    return value


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise _fail(where, f"expected a list of non-negative integers, got {value!r}")
    shape = tuple(_count(v, where) for v in value)
    if math.prod(shape) > MAX_NUMEL:
        raise _fail(where, f"shape {list(shape)} is too large")
    return shape


def _name(value: Any, where: str) -> str:
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_NAME_CHARS
        or not value.isprintable()
    ):
        raise _fail(where, f"invalid name {value!r}")
    return value


def safe_file_name(value: Any, where: str) -> str:
    """A data file name that stays inside the checkpoint directory (no path, no '..')."""
    if not isinstance(value, str) or not DATA_FILE_RE.match(value):
        raise _fail(
            where,
            f"unsafe or invalid data file name {value!r}: must be a plain "
            "'<name>.<12 hex>.arrow' inside the checkpoint directory",
        )
    return value


def _tensor_entry(obj: Any, files: dict[str, FileEntry], where: str) -> TensorEntry:
    if not isinstance(obj, dict):
        raise _fail(where, "expected an object")
    fmt = _get(obj, "format", str, where)
    dtype = _get(obj, "dtype", str, where)
    if fmt not in (CSR, DENSE):
        raise UnsupportedFormatError(f"{where}: unsupported tensor format {fmt!r}")
    if dtype not in TORCH_DTYPES:
        raise UnsupportedFormatError(f"{where}: dtype {dtype!r} is not in the allowlist")
    shape = _shape(_get(obj, "shape", list, where), f"{where}.shape")
    tensor_shape = _shape(_get(obj, "tensor_shape", list, where), f"{where}.tensor_shape")
    data_types = _get(obj, "data_types", dict, where)
    nnz = _count(_get(obj, "number_of_stored_values", int, where), where)
    file = _get(obj, "file", str, where)
    if file not in files:  # names under 'files' are validated: this one is safe too
        safe_file_name(file, f"{where}.file")
        raise _fail(where, f"file {file!r} is not listed under 'files'")
    pattern = obj.get("pattern")
    if pattern is not None:
        _name(pattern, f"{where}.pattern")
    values_type = STORED_TYPE[dtype]
    if fmt == DENSE:
        expected_keys: tuple[str, ...] = ("values",)
        if shape != tensor_shape or nnz != math.prod(shape) or pattern is not None:
            raise _fail(where, "a DENSE tensor needs shape == tensor_shape, all values stored")
    else:
        expected_keys = ("values",) if pattern is not None else CSR_KEYS
        if dtype not in MASKED_DTYPES:
            raise UnsupportedFormatError(f"{where}: CSR tensors must be float, got {dtype!r}")
        if (
            len(tensor_shape) < 2
            or shape != (tensor_shape[0], math.prod(tensor_shape[1:]))
            or nnz > math.prod(shape)
        ):
            raise _fail(
                where,
                f"CSR shape {list(shape)} is not the (rows, cols) view of {list(tensor_shape)} "
                f"holding {nnz} values",
            )
    if set(data_types) != set(expected_keys):
        raise _fail(where, f"data_types must have the keys {list(expected_keys)}")
    if data_types["values"] != values_type:
        raise UnsupportedFormatError(
            f"{where}: values stored as {data_types['values']!r}, dtype {dtype} needs "
            f"{values_type!r}"
        )
    for key in expected_keys[:-1]:
        if data_types[key] not in INDEX_TYPES:
            raise UnsupportedFormatError(
                f"{where}: index type {data_types[key]!r} is not one of {list(INDEX_TYPES)}"
            )
    return TensorEntry(
        format=fmt,
        shape=shape,
        tensor_shape=tensor_shape,
        dtype=dtype,
        data_types=dict(data_types),
        number_of_stored_values=nnz,
        file=file,
        batch=_count(_get(obj, "batch", int, where), f"{where}.batch"),
        row=_count(_get(obj, "row", int, where), f"{where}.row"),
        bytes=_count(_get(obj, "bytes", int, where), f"{where}.bytes"),
        pattern=pattern,
    )


def _optimizer(
    obj: Any, files: dict[str, FileEntry], tensors: dict[str, TensorEntry], where: str
) -> tuple[list[dict[str, Any]], OptimizerState]:
    if not isinstance(obj, dict):
        raise _fail(where, "expected an object or null")
    groups = _get(obj, "param_groups", list, where)
    if not all(isinstance(g, dict) for g in groups):
        raise _fail(f"{where}.param_groups", "expected a list of objects")
    state: OptimizerState = {}
    for param, entries in _get(obj, "state", dict, where).items():
        _name(param, f"{where}.state")
        if not isinstance(entries, dict):
            raise _fail(f"{where}.state[{param!r}]", "expected an object")
        state[param] = {}
        for key, item in entries.items():
            at = f"{where}.state[{param!r}][{key!r}]"
            _name(key, at)
            if not isinstance(item, dict) or len(item) != 1 or not {"tensor", "value"} >= set(item):
                raise _fail(at, "expected {'tensor': {...}} or {'value': ...}")
            if "value" in item:
                state[param][key] = item["value"]
                continue
            entry = _tensor_entry(item["tensor"], files, at)
            if entry.format == CSR:
                owner = tensors.get(entry.pattern or "")
                if (
                    entry.pattern is None
                    or owner is None
                    or owner.format != CSR
                    or owner.pattern is not None
                    or owner.tensor_shape != entry.tensor_shape
                    or owner.number_of_stored_values != entry.number_of_stored_values
                ):
                    raise _fail(at, f"pattern {entry.pattern!r} is not a matching CSR tensor")
            state[param][key] = entry
    return groups, state


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Validate manifest bytes read from ``where``; raises ManifestError or
    UnsupportedFormatError saying what is wrong."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _fail(where, f"{len(data)} bytes is larger than the {MAX_MANIFEST_BYTES} limit")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(where, f"not valid UTF-8 JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _fail(where, "expected a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise UnsupportedFormatError(
            f"{where}: format is {doc.get('format')!r}, expected {FORMAT_NAME!r}"
        )
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: format_version {version!r} is not supported (this reader knows "
            f"version {FORMAT_VERSION})"
        )
    created_at = _get(doc, "created_at", str, where)
    try:
        datetime.strptime(created_at, TIME_FORMAT)
    except ValueError:
        raise _fail(where, f"created_at {created_at!r} is not {TIME_FORMAT}") from None
    save_id = _get(doc, "save_id", str, where)
    if not SAVE_ID_RE.match(save_id):
        raise _fail(where, f"save_id {save_id!r} is not 12 lowercase hex digits")
    files: dict[str, FileEntry] = {}
    for name, entry in _get(doc, "files", dict, where).items():
        at = f"{where}: files[{name!r}]"
        safe_file_name(name, f"{where}: files")
        if not isinstance(entry, dict):
            raise _fail(at, "expected an object")
        sha = _get(entry, "sha256", str, at)
        if not SHA256_RE.match(sha):
            raise _fail(at, f"sha256 {sha!r} is not 64 lowercase hex digits")
        files[name] = FileEntry(bytes=_count(_get(entry, "bytes", int, at), at), sha256=sha)
    tensors = {
        _name(name, f"{where}: tensors"): _tensor_entry(obj, files, f"{where}: tensors[{name!r}]")
        for name, obj in _get(doc, "tensors", dict, where).items()
    }
    for name, entry in tensors.items():
        if entry.pattern is not None:
            raise _fail(f"{where}: tensors[{name!r}]", "model tensors cannot borrow a pattern")
    groups, state = None, None
    if doc.get("optimizer") is not None:
        groups, state = _optimizer(doc["optimizer"], files, tensors, f"{where}: optimizer")
    return Manifest(
        created_at=created_at,
        save_id=save_id,
        files=files,
        tensors=tensors,
        param_groups=groups,
        optimizer_state=state,
        metadata=_get(doc, "metadata", dict, where),
    )
