"""Real image files for data tests: an ImageFolder tree of JPEG files written with PIL, and
the CIFAR-10 python batches layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("ant", "bee", "cow")


def write_jpeg_tree(root: Path, train: int = 12, val: int = 4, size: int = 32) -> Path:
    """An ImageFolder tree of real JPEG files: ``train`` / ``val`` images per class."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a class colour
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def write_cifar_batches(root: Path, per_batch: int = 4) -> Path:
    """The CIFAR-10 python batches layout with ``per_batch`` images in each batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root
