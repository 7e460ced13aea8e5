"""Sparse checkpoints: every masked weight as CSR in Arrow IPC files, on local disk or S3.

Format: docs/checkpoint-format.md. Entry points: ``save_sparse``, ``load_sparse``,
``list_checkpoints``, ``latest_checkpoint`` and ``set_aside`` (for a checkpoint that failed
verification); every failure is a ``CheckpointError``.
``open_storage(uri, storage_options)`` gives the ``Storage`` everything else a run writes goes
through (plain objects, the storage probe, Ray Train's pyarrow filesystem).
"""

from granet_ray.store.api import (
    SparseCheckpoint,
    delete_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_sparse,
    save_sparse,
    set_aside,
)
from granet_ray.store.errors import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    InvalidInputError,
    InvalidURIError,
    ManifestError,
    MissingFileError,
    ModelMismatchError,
    SchemaMismatchError,
    StorageAuthError,
    StorageError,
    StorageUnreachableError,
    TruncatedFileError,
    UnsupportedFormatError,
)
from granet_ray.store.format import FORMAT_VERSION
from granet_ray.store.optimizer import optimizer_state_by_name, optimizer_state_from_names
from granet_ray.store.storage import Storage, open_storage

__all__ = [
    "FORMAT_VERSION",
    "BucketNotFoundError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "InvalidInputError",
    "InvalidURIError",
    "ManifestError",
    "MissingFileError",
    "ModelMismatchError",
    "SchemaMismatchError",
    "SparseCheckpoint",
    "Storage",
    "StorageAuthError",
    "StorageError",
    "StorageUnreachableError",
    "TruncatedFileError",
    "UnsupportedFormatError",
    "delete_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_sparse",
    "open_storage",
    "optimizer_state_by_name",
    "optimizer_state_from_names",
    "save_sparse",
    "set_aside",
]
