"""The checkpoint format's closed vocabulary: name, version, file names, formats and dtypes.

See docs/checkpoint-format.md. Everything a reader accepts is listed here; anything else is
rejected with a typed error.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import torch

FORMAT_NAME = "granet-ray-sparse-checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 2**20

CSR = "CSR"
DENSE = "DENSE"

# Data files: flat names inside the checkpoint directory, never a path.
DATA_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,150}\.[0-9a-f]{12}\.arrow$")

# Stored (Arrow) types by their binsparse names; bint8 is a bool stored as int8 0 / 1.
ARROW_TYPES: dict[str, pa.DataType] = {
    "bint8": pa.int8(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
}

NUMPY_TYPES: dict[str, np.dtype] = {
    name: np.dtype("int8" if name == "bint8" else name) for name in ARROW_TYPES
}

# Tensor dtypes (torch names) -> the stored type of their values. bfloat16 is stored as its
# uint16 bit pattern (Arrow has no bfloat16), bool as bint8.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
STORED_TYPE: dict[str, str] = {name: name for name in TORCH_DTYPES} | {
    "bfloat16": "uint16",
    "bool": "bint8",
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}

# Masked (CSR) tensors hold floating-point weights only.
MASKED_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
INDEX_TYPES = ("uint8", "uint16", "uint32", "uint64")

# Arrow IPC compression for data files: used where it makes a file >= 1% smaller.
COMPRESSION = pa.Codec("zstd", compression_level=3)
MIN_COMPRESSION_GAIN = 0.01


def index_type(max_value: int) -> str:
    """The smallest unsigned stored type holding integers in [0, max_value]."""
    for name, bits in zip(INDEX_TYPES, (8, 16, 32, 64), strict=True):
        if max_value < 2**bits:
            return name
    raise ValueError(f"index {max_value} does not fit in 64 bits")


def csr_schema(indptr_type: str, indices_type: str, values_type: str) -> pa.Schema:
    """Schema of a CSR file: ``name`` and list columns ``indptr``, ``indices``, ``values``."""
    return pa.schema(
        [
            ("name", pa.string()),
            ("indptr", pa.list_(ARROW_TYPES[indptr_type])),
            ("indices", pa.list_(ARROW_TYPES[indices_type])),
            ("values", pa.list_(ARROW_TYPES[values_type])),
        ]
    )


def values_schema(values_type: str) -> pa.Schema:
    """Schema of a dense or pattern-values file: ``name`` and a list column ``values``."""
    return pa.schema([("name", pa.string()), ("values", pa.list_(ARROW_TYPES[values_type]))])
