"""``granet-ray data pack SRC DEST``: an ImageFolder tree or the CIFAR-10 python batches as a
packed dataset (``granet_ray.store.dataset``) in a local folder or at ``s3://bucket/prefix``.

Images are stored as they are: ImageFolder files keep their encoding (JPEG, PNG, ...);
CIFAR-10's raw 32x32 pixels are encoded as PNG (lossless), so every packed image is decoded
the same way. Each split's samples are shuffled once (a fixed seed) before they are cut into
shards of about ``shard_mb`` megabytes, so every shard holds a mix of classes: the
block shuffle of training (``data.sharding.block_order``) then mixes classes within every
block. The pack is resumable: a second run of the same source reuses the shards written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from granet_ray.store.dataset import (
    PackedIndex,
    PackWriter,
    ShardEntry,
    dataset_storage_for_pack,
    encode_shard,
)

PACK_SEED = 20260  # the fixed shuffle of samples into shards
DEFAULT_SHARD_MB = 64.0
DEFAULT_BLOCK_SHARDS = 8
# torchvision's ImageFolder extensions
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}

Progress = Callable[[int, int], None]  # (samples done, samples in all)


@dataclass(frozen=True)
class Sample:
    """One image of a source: ``size`` (bytes, or an estimate) cuts the shards; ``load``
    gives the encoded image."""

    label: int
    size: int
    load: Callable[[], bytes]


@dataclass(frozen=True)
class Source:
    """What a pack reads: class names, each split's samples, how images are encoded and a
    signature of the files (a journal of another signature is not reused)."""

    classes: tuple[str, ...]
    splits: dict[str, list[Sample]]
    encoding: str
    signature: str


def image_folder_source(root: Path) -> Source:
    """An ImageFolder tree: ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``
    with the same class folders."""
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{root} is not an ImageFolder tree: {folder} is missing (expected train/ and "
                "val/, one sub-folder of images per class)"
            )
        classes[split] = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes["train"] != classes["val"] or not classes["train"]:
        raise ValueError(
            f"the class folders of {root / 'train'} ({len(classes['train'])}) and "
            f"{root / 'val'} ({len(classes['val'])}) differ or are empty"
        )
    names = tuple(classes["train"])
    splits: dict[str, list[Sample]] = {}
    listing = []
    for split in ("train", "val"):
        samples = []
        for label, name in enumerate(names):
            for path in sorted((root / split / name).iterdir()):
                if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                    stat = path.stat()
                    samples.append(Sample(label, stat.st_size, path.read_bytes))
                    listing.append([split, name, path.name, stat.st_size, stat.st_mtime_ns])
        if not samples:
            raise ValueError(f"no images in {root / split}")
        splits[split] = samples
    return Source(names, splits, "imagefolder files as is", _signature(listing))


def cifar10_source(root: Path) -> Source:
    """The CIFAR-10 python batches in ``root`` or ``root/cifar-10-batches-py``; images
    encoded as PNG."""
    folder = root if (root / "batches.meta").is_file() else root / CIFAR_FOLDER
    files = [*CIFAR_SPLITS["train"], *CIFAR_SPLITS["val"], "batches.meta"]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing CIFAR-10 batches {', '.join(missing)}")
    meta = _unpickle(folder / "batches.meta")
    classes = tuple(str(n) for n in meta["label_names"])
    splits: dict[str, list[Sample]] = {}
    for split, names in CIFAR_SPLITS.items():
        samples = []
        for name in names:
            batch = _unpickle(folder / name)
            pixels = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            for image, label in zip(pixels, batch["labels"], strict=True):
                samples.append(Sample(int(label), 3072, _png(image.transpose(1, 2, 0))))
        splits[split] = samples
    listing = [[f, (folder / f).stat().st_size, (folder / f).stat().st_mtime_ns] for f in files]
    return Source(classes, splits, "png (from cifar-10 python batches)", _signature(listing))


def open_source(src: str | os.PathLike[str]) -> Source:
    """The source at ``src``: CIFAR-10 batches if it holds them, else an ImageFolder tree."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    if (root / "batches.meta").is_file() or (root / CIFAR_FOLDER / "batches.meta").is_file():
        return cifar10_source(root)
    return image_folder_source(root)


def shard_plan(samples: Sequence[Sample], shard_bytes: int) -> list[list[int]]:
    """The samples of every shard (indices into ``samples``): a fixed shuffle, then cut
    whenever a shard reaches ``shard_bytes``."""
    order = np.random.default_rng(PACK_SEED).permutation(len(samples))
    shards: list[list[int]] = [[]]
    filled = 0
    for i in order.tolist():
        if filled >= shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(i)
        filled += samples[i].size
    return shards


def pack(
    src: str | os.PathLike[str],
    dest: str,
    *,
    storage_options: dict[str, Any] | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    block_shards: int = DEFAULT_BLOCK_SHARDS,
    progress: Progress | None = None,
) -> PackedIndex:
    """Pack ``src`` (ImageFolder tree or CIFAR-10 batches) into ``dest`` (a local folder or
    ``s3://bucket/prefix``) and return the index. Shards first, the index last: a killed
    pack leaves no dataset, and running it again completes it, reusing the shards written.

    Args:
        src: the source folder.
        dest: where the packed dataset goes.
        storage_options: S3 credentials and endpoint for an ``s3://`` ``dest``.
        shard_mb: about this many megabytes per shard.
        block_shards: shards per shuffle block of training (recorded in the index).
        progress: called with (samples done, samples in all) as shards are written.
    """
    if not (shard_mb > 0):
        raise ValueError(f"shard_mb={shard_mb!r} is invalid: must be > 0")
    if not (isinstance(block_shards, int) and block_shards >= 1):
        raise ValueError(f"block_shards={block_shards!r} is invalid: must be an integer >= 1")
    source = open_source(src)
    shard_bytes = int(shard_mb * 2**20)
    plans = {split: shard_plan(s, shard_bytes) for split, s in source.splits.items()}
    signature = _signature([source.signature, shard_bytes, PACK_SEED, source.encoding])
    writer = PackWriter(dataset_storage_for_pack(dest, storage_options), signature)
    total = sum(len(s) for s in source.splits.values())
    done = 0
    entries: dict[str, list[ShardEntry]] = {}
    for split, shards in plans.items():
        samples = source.splits[split]
        entries[split] = []
        for number, members in enumerate(shards):
            name = f"{split}/shard-{number:05d}.arrow"
            entry = writer.reusable(name)
            if entry is None:
                images = [samples[i].load() for i in members]
                labels = [samples[i].label for i in members]
                entry = writer.put_shard(name, encode_shard(images, labels), len(members))
            entries[split].append(entry)
            done += len(members)
            if progress is not None:
                progress(done, total)
    return writer.commit(source.classes, entries, block_shards, source.encoding)


def _signature(parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _unpickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _png(pixels: np.ndarray) -> Callable[[], bytes]:
    def encode() -> bytes:
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG")
        return out.getvalue()

    return encode


def iter_split_sizes(index: PackedIndex) -> Iterator[tuple[str, int, int, int]]:
    """(split, shards, samples, bytes) of every split of ``index``."""
    for split, entries in index.splits.items():
        yield split, len(entries), sum(e.samples for e in entries), sum(e.size for e in entries)
