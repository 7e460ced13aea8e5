"""A packed dataset streamed from object storage: ``PackedDataset``, a map-style torch dataset
over the shards of ``granet-ray data pack`` (``granet_ray.store.dataset``), in a local folder
or at ``s3://bucket/prefix``.

Each process fetches only the shards its samples need into a local cache bounded in bytes
(shared by the processes of a node, least recently used out first), verifies every shard
(size and sha256) before it uses a sample of it, and decodes and augments in the
``DataLoader`` worker processes. Its ``epoch_order`` is a block shuffle
(``data.sharding.block_order``): a function of (seed, epoch, the packed index) alone, so
the run's global order, its resume and its elastic resize at sample granularity stay those
of every other dataset. ``follow(shares)`` (called by the training loop with this worker's
steps of an epoch) prefetches, in a thread of the training process, the shards of the next
block ahead of the step that needs them.

A user's dataset factory can return ``PackedDataset(uri, split, transform=...)`` for their
own packed data.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from granet_ray.config import RunSettings
from granet_ray.data.bundle import DataBundle, check_train_size
from granet_ray.data.sharding import StepShare, block_order
from granet_ray.store.dataset import (
    PackedIndex,
    Shard,
    ShardCache,
    fetch_shard,
    open_dataset_storage,
    open_shard,
    read_index,
)
from granet_ray.store.storage import Storage

DEFAULT_CACHE_DIR = "~/.cache/granet-ray/data"
DEFAULT_CACHE_GB = 8.0


@dataclass(frozen=True)
class StreamOptions:
    """How a process reads packed datasets: ``storage_options`` (S3 credentials and
    endpoint, for ``s3://`` roots), the shard cache's folder (None: ``DEFAULT_CACHE_DIR``)
    and its size in GB."""

    storage_options: dict[str, Any] | None = None
    cache_dir: str | None = None
    cache_gb: float = DEFAULT_CACHE_GB

    @classmethod
    def of(cls, settings: RunSettings) -> StreamOptions:
        """The stream options of a run's settings (``data_options``, ``data_cache_*``)."""
        return cls(settings.data_options, settings.data_cache_dir, settings.data_cache_gb)


class PackedDataset(Dataset):
    """One split of a packed dataset. Items are ``(transform(image), label)`` with the image
    a PIL RGB image (no transform: the image itself).

    Args:
        uri: the packed dataset, a local folder or ``s3://bucket/prefix``.
        split: ``train`` or ``val``.
        storage_options: S3 credentials and endpoint (``key``, ``secret``,
            ``endpoint_url``, ...), ignored for a local folder.
        cache_dir: the local shard cache (default ``~/.cache/granet-ray/data``).
        cache_gb: the cache's bound; it must hold two blocks of the largest shards.
        transform: applied to each decoded image (in the data-loader processes).
        limit: keep the first ``limit`` samples of the split (whole shards but the last).

    Raises:
        DatasetError: no index at ``uri``, or an invalid one (naming the URI).
        StorageError: the storage cannot be reached (naming the URI and endpoint).
        ValueError: a ``cache_gb`` too small for two blocks, or a bad ``limit``.
    """

    def __init__(
        self,
        uri: str,
        split: str = "train",
        *,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_gb: float = DEFAULT_CACHE_GB,
        transform: Callable[[Any], Any] | None = None,
        limit: int | None = None,
    ) -> None:
        storage = open_dataset_storage(uri, storage_options)
        self.index: PackedIndex = read_index(storage)
        self.uri = storage.uri
        self.split = split
        self.transform = transform
        self.entries = self.index.shards(split)
        counts = [e.samples for e in self.entries]
        check_train_size(limit, sum(counts), self.uri)
        if limit is not None:
            keep = int(np.searchsorted(np.cumsum(counts), limit)) + 1
            counts = counts[:keep]
            counts[-1] -= sum(counts) - limit
            self.entries = self.entries[:keep]
        self.counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.sample_shards = np.repeat(np.arange(len(counts)), counts)  # shard of each sample
        self.block = self.index.block_shards
        largest = max(e.size for e in self.entries)
        needed = 2 * min(self.block, len(self.entries)) * largest
        if cache_gb * 2**30 < needed:
            raise ValueError(
                f"data_cache_gb={cache_gb:g} is invalid: the cache of {self.uri} must hold two "
                f"blocks of {self.block} shards of up to {largest / 2**20:.1f} MB, at least "
                f"{needed / 2**30:.2f} GB"
            )
        self.cache = ShardCache(cache_dir or DEFAULT_CACHE_DIR, int(cache_gb * 2**30))
        self._options = storage_options
        self._storage: Storage | None = storage
        self._pid = os.getpid()
        self._open: OrderedDict[int, Shard] = OrderedDict()
        # when each shard was last read (ns), shared with the forked loader processes: the
        # prefetcher's measure of how far the loaders have come
        self._used = RawArray("q", len(self.entries))
        self._prefetch: _Prefetch | None = None
        self._blocks: np.ndarray | None = None  # each shard's block in the last epoch_order

    @property
    def fingerprint(self) -> str:
        """The packed dataset's fingerprint (sha256 of its index)."""
        return self.index.fingerprint

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, by label."""
        return self.index.classes

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)} in {self.uri} ({self.split})")
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        shard = self._shard(s)
        self._used[s] = time.time_ns()
        local = int(i - self.offsets[s])
        image = decode_image(shard.image(local))
        label = int(shard.labels[local])
        return (self.transform(image) if self.transform else image), label

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The permutation of the samples of epoch ``epoch``: the block shuffle of the
        shards (``sharding.block_order``), the same in every process and at any number of
        workers. Also notes which block each shard is in, for ``follow``."""
        order = block_order(self.counts, self.block, seed, epoch)
        # the shards of a block all begin before the next block's: by first appearance,
        # every run of ``block`` shards is one block
        shards, first = np.unique(self.sample_shards[order], return_index=True)
        self._blocks = np.empty(len(self.counts), dtype=np.int64)
        self._blocks[shards[np.argsort(first)]] = np.arange(len(shards)) // self.block
        return order

    def shard_of(self, indices: np.ndarray) -> np.ndarray:
        """The shard number of every sample index."""
        return np.searchsorted(self.offsets, indices, side="right") - 1

    def follow(self, shares: Sequence[StepShare]) -> None:
        """Prefetch, in a thread of this process, the shards of ``shares`` (this worker's
        steps of the epoch whose ``epoch_order`` was computed last) in the order they are
        first needed, up to the end of the block after the one the loader processes read
        last; replaces the previous epoch's."""
        if self._prefetch is not None:
            self._prefetch.stop()
        indices = np.concatenate([s.indices for s in shares]) if shares else np.array([])
        firsts = self.shard_of(indices.astype(np.int64))
        _, where = np.unique(firsts, return_index=True)
        need = firsts[np.sort(where)]
        blocks = self._blocks[need] if self._blocks is not None else need // self.block
        self._prefetch = _Prefetch(self, need.tolist(), blocks.tolist())

    def fetch(self, s: int) -> None:
        """Make sure shard ``s`` is verified in the cache."""
        self.cache.get(self._store(), self.index, self.entries[s])

    def _store(self) -> Storage:
        """The storage, opened anew in a forked loader process."""
        if self._storage is None or self._pid != os.getpid():
            self._storage = open_dataset_storage(self.uri, self._options)
            self._pid = os.getpid()
        return self._storage

    def _shard(self, s: int) -> Shard:
        shard = self._open.get(s)
        if shard is not None:
            self._open.move_to_end(s)
            return shard
        entry = self.entries[s]
        path = self.cache.get(self._store(), self.index, entry)
        shard = open_shard(path, self.index.shard_uri(entry), entry.samples)
        self._open[s] = shard
        while len(self._open) > 2 * self.block:
            self._open.popitem(last=False)
        return shard

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_storage=None, _open=OrderedDict(), _prefetch=None)
        return state


class _Prefetch:
    """The thread that keeps this worker's shards of the current and the next block in the
    cache (so a node's workers together hold at most two blocks). A failure ends it
    quietly: the process that needs the shard fetches it itself and raises the error."""

    def __init__(self, dataset: PackedDataset, need: list[int], blocks: list[int]) -> None:
        self.dataset = dataset
        self.need = need
        self.blocks = blocks  # the block of each shard of ``need``
        self.since = time.time_ns()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, name="granet-prefetch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=30)

    def reached(self, upto: int) -> int:
        """The last position in ``need`` whose shard a loader has read since the epoch
        began (-1 for none), searching on from ``upto``."""
        used = self.dataset._used
        while upto + 1 < len(self.need) and used[self.need[upto + 1]] >= self.since:
            upto += 1
        return upto

    def run(self) -> None:
        reached = -1
        for j, s in enumerate(self.need):
            while self.blocks[j] > self.blocks[max(reached, 0)] + 1:
                if self.done.wait(0.05):
                    return
                reached = self.reached(reached)
            if self.done.is_set():
                return
            try:
                self.dataset.fetch(s)
            except Exception:  # the loader raises it, naming the shard
                return


def decode_image(data: bytes) -> Any:
    """A PIL RGB image from encoded bytes (JPEG, PNG, ...)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def probe_packed(
    uri: str, storage_options: dict[str, Any] | None = None, train_size: int | None = None
) -> PackedIndex:
    """Check a packed dataset before a run, within seconds: its index reads and parses, its
    first training shard fetches and verifies, ``train_size`` fits. Raises the store's
    ``StorageError`` kinds (unreachable, credentials, bucket) or ``DatasetError`` naming
    the URI or shard, ``ValueError`` for ``train_size``."""
    storage = open_dataset_storage(uri, storage_options, bounded=True)
    index = read_index(storage)
    entries = index.shards("train")
    index.shards("val")
    check_train_size(train_size, sum(e.samples for e in entries), storage.uri)
    fetch_shard(storage, index, entries[0])
    return index


def build_packed(
    root: str,
    transforms: tuple[Callable[[Any], Any], Callable[[Any], Any]],
    input_shape: tuple[int, int, int],
    train_size: int | None,
    stream: StreamOptions | None,
) -> DataBundle:
    """The train and val splits of the packed dataset at ``root`` with the (train, test)
    ``transforms``; ``train_size`` keeps the first N training samples (the pack shuffled
    them once)."""
    stream = stream or StreamOptions()
    common: dict[str, Any] = {
        "storage_options": stream.storage_options,
        "cache_dir": stream.cache_dir,
        "cache_gb": stream.cache_gb,
    }
    train = PackedDataset(root, "train", transform=transforms[0], limit=train_size, **common)
    test = PackedDataset(root, "val", transform=transforms[1], **common)
    return DataBundle(
        train=train, test=test, num_classes=len(train.classes), input_shape=input_shape
    )


# the datasets whose packed form the jobs read: their transforms and input shape
PACKED_VISION = {"cifar10": (3, 32, 32), "imagenet": (3, 224, 224)}


def build_packed_vision(
    name: str, root: str, train_size: int | None, stream: StreamOptions | None
) -> DataBundle:
    """``cifar10`` or ``imagenet`` from a packed dataset at ``root`` (local folder or
    ``s3://``), with that dataset's standard augmentation."""
    from granet_ray.data.vision import cifar10_transforms, imagenet_transforms

    if name not in PACKED_VISION:
        raise ValueError(
            f"dataset {name!r} does not read packed data (--data-root {root}); packed data "
            f"serves {', '.join(PACKED_VISION)}"
        )
    transforms = cifar10_transforms() if name == "cifar10" else imagenet_transforms()
    return build_packed(root, transforms, PACKED_VISION[name], train_size, stream)
