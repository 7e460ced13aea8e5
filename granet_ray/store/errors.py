"""Typed errors of the checkpoint store: one base class, one subclass per kind of bad input.

Every message says what is wrong and where (the URI, and the file or tensor when there is one).
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error raised by ``granet_ray.store``.

    Catch it to handle any failure of ``save_sparse``, ``load_sparse``, ``list_checkpoints``
    or ``latest_checkpoint``; its subclasses tell bad input (InvalidURIError,
    InvalidInputError, ModelMismatchError), a missing or existing checkpoint
    (CheckpointNotFoundError, CheckpointExistsError), a damaged one (ManifestError,
    UnsupportedFormatError, CorruptCheckpointError and its subclasses) and storage failures
    (StorageError and its subclasses) apart.

    Args:
        message: what is wrong and where (the URI, and the file or tensor when there is one).
    """


class InvalidURIError(CheckpointError):
    """The URI is malformed, has an unsupported scheme, or storage options do not apply."""


class InvalidInputError(CheckpointError):
    """Bad arguments to save or load: masks, state, dtypes, metadata, layout."""


class StorageError(CheckpointError):
    """The storage backend failed (local file system or S3)."""


class StorageUnreachableError(StorageError):
    """The S3 endpoint cannot be reached (connection refused, DNS, timeout)."""


class StorageAuthError(StorageError):
    """The S3 endpoint refused the credentials or denied access."""


class BucketNotFoundError(StorageError):
    """The S3 bucket does not exist."""


class CheckpointNotFoundError(CheckpointError):
    """No committed checkpoint at the URI: ``manifest.json`` is missing."""


class CheckpointExistsError(CheckpointError):
    """Saving would replace a committed checkpoint and ``overwrite`` was not given."""


class ManifestError(CheckpointError):
    """``manifest.json`` is not valid JSON, misses fields, or names an unsafe file."""


class UnsupportedFormatError(CheckpointError):
    """Unknown format name or version, or a format / dtype outside the allowlist."""


class CorruptCheckpointError(CheckpointError):
    """A data file does not match what the manifest promises."""


class MissingFileError(CorruptCheckpointError):
    """A file listed in the manifest does not exist."""


class TruncatedFileError(CorruptCheckpointError):
    """A file's byte size differs from the size in the manifest."""


class ChecksumMismatchError(CorruptCheckpointError):
    """A file's sha256 differs from the manifest's."""


class SchemaMismatchError(CorruptCheckpointError):
    """A file's Arrow schema, dtypes or array lengths disagree with the manifest."""


class ModelMismatchError(CheckpointError):
    """The checkpoint does not fit the target model: missing / unexpected keys or shapes."""
