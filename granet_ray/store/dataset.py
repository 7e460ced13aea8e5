"""Packed datasets: encoded images in Arrow IPC shards, an index, and a local shard cache.

A packed dataset is one directory (local folder or ``s3://bucket/prefix``)::

    index.json                  written last: without it nothing reads as a dataset
    train/shard-00000.arrow     Arrow IPC file: ``image`` (binary: the encoded file as is),
    train/shard-00001.arrow     ``label`` (int32)
    val/shard-00000.arrow
    pack-journal.json           only while a pack is unfinished (shards done so far)

``index.json`` holds the class names, and per split every shard's name, sample count, byte
size and sha256; the dataset's fingerprint is the sha256 of the index's bytes. Packing uses
the store's commit protocol (data first, the index last, as for checkpoints), so a killed
pack leaves no index, and a second pack reuses the shards its journal lists and the store
holds at the listed size. A shard is verified (size and sha256) when it is fetched, before
any of its samples is used; the cache keeps verified shards on local disk under their
sha256, bounded in bytes (least recently used first out), shared by the processes of a node
(one fetches a shard, the others wait for it).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from granet_ray.store.errors import CheckpointError
from granet_ray.store.storage import PROBE_CONFIG, Storage, open_storage

INDEX_NAME = "index.json"
JOURNAL_NAME = "pack-journal.json"
DATASET_FORMAT = "granet-ray-packed"
DATASET_VERSION = 1
SPLITS = ("train", "val")
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int32())])


class DatasetError(CheckpointError):
    """A packed dataset cannot be used: its index or a shard is missing, truncated, corrupt
    or changed. The message is one line naming the dataset's URI or the shard's.

    Raised inside a ``DataLoader`` process, the loader re-raises it in the training process
    with its traceback as the message; the constructor keeps the original line only.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_original_line(message, type(self).__name__))


class DatasetNotFoundError(DatasetError):
    """No ``index.json`` at the URI: not a packed dataset (or a pack never finished)."""


class DatasetIndexError(DatasetError):
    """``index.json`` is not a valid index (JSON, fields, format version)."""


class ShardMissingError(DatasetError):
    """A shard listed in the index does not exist."""


class ShardCorruptError(DatasetError):
    """A shard's size or sha256 differs from the index (truncated, corrupt or replaced)."""


def _original_line(message: str, name: str) -> str:
    """The message itself, or, for a DataLoader's re-raise ("Caught X in DataLoader worker
    process 0. Original Traceback ..."), the line the worker raised."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    for line in reversed(message.splitlines()):
        head, sep, rest = line.partition(": ")
        if sep and head.rpartition(".")[2] == name:
            return rest
    return message


@dataclass(frozen=True)
class ShardEntry:
    """One shard of a split: its object name (``train/shard-00000.arrow``), samples, byte
    size and sha256 (hex)."""

    name: str
    samples: int
    size: int
    sha256: str


@dataclass(frozen=True)
class PackedIndex:
    """A packed dataset's index: ``uri``, ``classes``, the shards of every split,
    ``block_shards`` (shards per shuffle block, fixed at pack time so the order is a
    function of the index), ``encoding`` (how images are stored) and ``fingerprint`` (the
    sha256 of ``index.json``)."""

    uri: str
    classes: tuple[str, ...]
    splits: Mapping[str, tuple[ShardEntry, ...]]
    block_shards: int
    encoding: str
    fingerprint: str

    def shards(self, split: str) -> tuple[ShardEntry, ...]:
        """The shards of ``split``; ``DatasetIndexError`` when the index has no such split."""
        if split not in self.splits:
            raise DatasetIndexError(
                f"packed dataset {self.uri} has no split {split!r} (it has "
                f"{', '.join(self.splits)})"
            )
        return self.splits[split]

    def shard_uri(self, entry: ShardEntry) -> str:
        """The URI of one shard."""
        return f"{self.uri.rstrip('/')}/{entry.name}"


def encode_shard(images: Sequence[bytes], labels: Sequence[int]) -> bytes:
    """The bytes of one shard: an Arrow IPC file of ``images`` (encoded files) and
    ``labels``, uncompressed (the images are compressed already)."""
    table = pa.table([pa.array(images, pa.binary()), pa.array(labels, pa.int32())], schema=SCHEMA)
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_table(table)
    return sink.getvalue()


@dataclass(frozen=True)
class Shard:
    """A verified shard opened from the cache: ``images`` (Arrow binary array, memory
    mapped) and ``labels``."""

    images: pa.Array
    labels: np.ndarray

    def image(self, i: int) -> bytes:
        """The encoded bytes of sample ``i`` of the shard."""
        return self.images[i].as_py()


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as hex."""
    return hashlib.sha256(data).hexdigest()


# ---- the index ----------------------------------------------------------------------------


def index_bytes(
    classes: Sequence[str],
    splits: Mapping[str, Sequence[ShardEntry]],
    block_shards: int,
    encoding: str,
) -> bytes:
    """The canonical bytes of an index (sorted keys, no spaces: its sha256 is the
    fingerprint)."""
    body = {
        "format": DATASET_FORMAT,
        "version": DATASET_VERSION,
        "classes": list(classes),
        "block_shards": block_shards,
        "encoding": encoding,
        "splits": {
            split: [
                {"name": e.name, "samples": e.samples, "size": e.size, "sha256": e.sha256}
                for e in entries
            ]
            for split, entries in splits.items()
        },
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def parse_index(data: bytes, uri: str) -> PackedIndex:
    """The ``PackedIndex`` of the bytes of ``index.json`` at ``uri``; ``DatasetIndexError``
    naming the URI and what is wrong."""
    where = f"{uri.rstrip('/')}/{INDEX_NAME}"
    try:
        body = json.loads(data)
        if body.get("format") != DATASET_FORMAT or body.get("version") != DATASET_VERSION:
            raise ValueError(
                f"format {body.get('format')!r} version {body.get('version')!r}, expected "
                f"{DATASET_FORMAT!r} version {DATASET_VERSION}"
            )
        splits = {
            split: tuple(
                ShardEntry(str(e["name"]), int(e["samples"]), int(e["size"]), str(e["sha256"]))
                for e in entries
            )
            for split, entries in body["splits"].items()
        }
        for entries in splits.values():
            for e in entries:
                if not e.name.startswith(tuple(f"{s}/" for s in splits)) or ".." in e.name:
                    raise ValueError(f"unsafe shard name {e.name!r}")
                if e.samples < 1 or e.size < 1 or len(e.sha256) != 64:
                    raise ValueError(f"bad entry for shard {e.name!r}")
        block = int(body["block_shards"])
        if block < 1:
            raise ValueError(f"block_shards={block}")
        classes = tuple(str(c) for c in body["classes"])
        encoding = str(body["encoding"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DatasetIndexError(f"invalid packed-dataset index {where}: {exc}") from None
    return PackedIndex(uri, classes, splits, block, encoding, sha256_hex(data))


def open_dataset_storage(
    uri: str, storage_options: dict[str, Any] | None = None, *, bounded: bool = False
) -> Storage:
    """The storage of a packed dataset (``storage_options`` apply to ``s3://`` URIs only and
    are dropped for local paths). ``bounded``: S3 requests give up within seconds (checks
    before a run), not after minutes of retries."""
    remote = str(uri).startswith(("s3://", "s3a://"))
    options = dict(storage_options or {}) if remote else {}
    if bounded and remote:
        options["config_kwargs"] = {**PROBE_CONFIG, **(options.get("config_kwargs") or {})}
    storage = open_storage(uri, options or None)
    if bounded and remote:
        storage.fs.retries = 1  # s3fs's own retry loop on top of botocore's
    return storage


def read_index(storage: Storage) -> PackedIndex:
    """The index of the packed dataset in ``storage``; ``DatasetNotFoundError`` when there
    is none (storage failures raise the store's ``StorageError`` kinds, naming the URI)."""
    data = storage.get(INDEX_NAME)
    if data is None:
        partial = storage.get(JOURNAL_NAME, limit=1) is not None
        why = "a pack of it is unfinished: run it again" if partial else "not a packed dataset"
        raise DatasetNotFoundError(f"no {INDEX_NAME} in {storage.uri}: {why}")
    return parse_index(data, storage.uri)


def is_packed(uri: str | os.PathLike[str] | None) -> bool:
    """Whether ``uri`` names a packed dataset: any ``s3://`` URI (checked when read), or a
    local folder holding an ``index.json`` (or the journal of an unfinished pack, which
    reading then reports)."""
    if uri is None:
        return False
    text = os.fspath(uri)
    if text.startswith(("s3://", "s3a://")):
        return True
    folder = Path(text.removeprefix("file://"))
    return (folder / INDEX_NAME).is_file() or (folder / JOURNAL_NAME).is_file()


# ---- shards -----------------------------------------------------------------------------


def fetch_shard(storage: Storage, index: PackedIndex, entry: ShardEntry) -> bytes:
    """The bytes of one shard, verified against the index (size, then sha256);
    ``ShardMissingError`` or ``ShardCorruptError`` naming the shard's URI."""
    data = storage.get(entry.name)
    uri = index.shard_uri(entry)
    if data is None:
        raise ShardMissingError(f"shard {uri} is missing (listed in {INDEX_NAME})")
    if len(data) != entry.size:
        raise ShardCorruptError(
            f"shard {uri} is {len(data)} bytes, the index says {entry.size}: truncated or "
            "replaced; pack the dataset again"
        )
    digest = sha256_hex(data)
    if digest != entry.sha256:
        raise ShardCorruptError(
            f"shard {uri} has sha256 {digest[:12]}..., the index says {entry.sha256[:12]}...: "
            "corrupt or replaced; pack the dataset again"
        )
    return data


def open_shard(path: str | os.PathLike[str], uri: str, samples: int) -> Shard:
    """A verified shard file of the cache, memory mapped; ``ShardCorruptError`` naming the
    shard's ``uri`` if it is not the Arrow file of ``samples`` images the index promises."""
    try:
        table = pa.ipc.open_file(pa.memory_map(os.fspath(path))).read_all()
        if table.schema != SCHEMA or table.num_rows != samples:
            raise ValueError(f"schema {table.schema} with {table.num_rows} rows")
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise ShardCorruptError(f"shard {uri} is not a valid shard: {exc}") from None
    column = table.column("image")  # one record batch per shard: no copy
    images = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    labels = table.column("label").to_numpy()
    return Shard(images, labels)


class ShardCache:
    """Verified shards on local disk, named by their sha256, at most ``budget`` bytes in
    all (least recently used out first); safe to share between processes (a file lock per
    shard: one process fetches it, the others wait). A file being read stays readable after
    another process evicts it."""

    def __init__(self, folder: str | os.PathLike[str], budget: int) -> None:
        self.folder = Path(folder).expanduser()
        self.budget = int(budget)

    def path(self, entry: ShardEntry) -> Path:
        """Where the shard lives in the cache (it may not be there)."""
        return self.folder / f"{entry.sha256}.arrow"

    def cached(self, entry: ShardEntry) -> bool:
        """Whether the verified shard is in the cache now."""
        try:
            return self.path(entry).stat().st_size == entry.size
        except FileNotFoundError:
            return False

    def get(self, storage: Storage, index: PackedIndex, entry: ShardEntry) -> Path:
        """The local path of the verified shard: from the cache (marked as just used), or
        fetched, verified and stored first (then older shards are evicted to the budget)."""
        path = self.path(entry)
        if self._touch(path, entry):
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock(f"{entry.sha256}.lock"):
            if self._touch(path, entry):
                return path
            data = fetch_shard(storage, index, entry)
            temp = self.folder / f".{entry.sha256}.{secrets.token_hex(6)}.tmp"
            temp.write_bytes(data)
            os.replace(temp, path)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path | None = None) -> None:
        """Delete the least recently used shards until the cache holds at most ``budget``
        bytes (never ``keep``)."""
        with self._lock("evict.lock"):
            files = []
            for path in self.folder.glob("*.arrow"):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                files.append((stat.st_mtime_ns, stat.st_size, path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.budget:
                    break
                if path == keep:
                    continue
                path.unlink(missing_ok=True)
                total -= size

    def _touch(self, path: Path, entry: ShardEntry) -> bool:
        """Mark a cached shard as just used; False when it is not (fully) there."""
        try:
            if path.stat().st_size != entry.size:
                path.unlink(missing_ok=True)
                return False
            os.utime(path)
            return True
        except FileNotFoundError:
            return False

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        with open(self.folder / name, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# ---- packing ----------------------------------------------------------------------------


class PackWriter:
    """Writes a packed dataset into ``storage`` by the commit protocol: every shard first
    (each ``put`` atomically, recorded in the journal), the index last, then the journal is
    deleted. ``source``: a signature of what is packed (and how); a journal of the same
    source lets a second pack reuse the shards it lists that the store holds at the listed
    size."""

    def __init__(self, storage: Storage, source: str) -> None:
        self.storage = storage
        self.source = source
        self.done: dict[str, ShardEntry] = {}
        journal = storage.get(JOURNAL_NAME)
        listed = storage.list()
        if journal is not None:
            try:
                body = json.loads(journal)
            except ValueError:
                body = {}
            if body.get("source") == source:
                for e in body.get("shards", []):
                    entry = ShardEntry(e["name"], e["samples"], e["size"], e["sha256"])
                    if listed.get(entry.name) == entry.size:
                        self.done[entry.name] = entry
        if INDEX_NAME in listed:
            storage.delete(INDEX_NAME)  # a new pack: the old dataset is gone from here on
        self._write_journal()

    def reusable(self, name: str) -> ShardEntry | None:
        """The entry of shard ``name`` when an earlier pack of this source wrote it."""
        return self.done.get(name)

    def put_shard(self, name: str, data: bytes, samples: int) -> ShardEntry:
        """Store one shard and journal it."""
        self.storage.put(name, data)
        entry = ShardEntry(name, samples, len(data), sha256_hex(data))
        self.done[name] = entry
        self._write_journal()
        return entry

    def commit(
        self,
        classes: Sequence[str],
        splits: Mapping[str, Sequence[ShardEntry]],
        block_shards: int,
        encoding: str,
    ) -> PackedIndex:
        """Write the index (the dataset now exists), delete the journal and any shard of
        an earlier pack that the index does not list; returns the index."""
        data = index_bytes(classes, splits, block_shards, encoding)
        self.storage.put(INDEX_NAME, data)
        self.storage.delete(JOURNAL_NAME)
        listed = {e.name for entries in splits.values() for e in entries}
        stale = [n for n in self.storage.list() if n.endswith(".arrow") and n not in listed]
        self.storage.delete(*stale)
        return parse_index(data, self.storage.uri)

    def _write_journal(self) -> None:
        shards = [
            {"name": e.name, "samples": e.samples, "size": e.size, "sha256": e.sha256}
            for e in self.done.values()
        ]
        body = {"source": self.source, "shards": shards}
        self.storage.put(JOURNAL_NAME, json.dumps(body).encode())


def dataset_storage_for_pack(uri: str, storage_options: dict[str, Any] | None = None) -> Storage:
    """The storage a pack writes into (made sure to be reachable and writable first)."""
    storage = open_dataset_storage(uri, storage_options)
    storage.probe()
    return storage
