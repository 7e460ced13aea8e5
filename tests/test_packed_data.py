"""Packed datasets without Ray: ``data pack`` of an ImageFolder tree of real JPEG files and of
CIFAR-10 batches (local and on SeaweedFS), a killed pack that a second run completes, the
block-shuffled order (the same at any number of workers, bounded shards in flight), the
bounded shard cache, and every kind of bad data ending in one line naming the shard or URI."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from images import CLASSES, write_cifar_batches, write_jpeg_tree
from torch.utils.data import DataLoader

from granet_ray import cli
from granet_ray.config import ConfigError, preset
from granet_ray.data import StreamOptions, build_datasets
from granet_ray.data.pack import pack
from granet_ray.data.packed import PackedDataset, probe_packed
from granet_ray.data.sharding import block_order, epoch_shares
from granet_ray.resume import METADATA_KIND, METADATA_VERSION, check_resumable
from granet_ray.store import StorageUnreachableError, load_sparse
from granet_ray.store.dataset import (
    INDEX_NAME,
    DatasetNotFoundError,
    PackWriter,
    ShardCorruptError,
    ShardMissingError,
    read_index,
)
from granet_ray.store.storage import open_storage
from granet_ray.testing.seaweedfs import SeaweedFS


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the JPEG tree, its packed dataset in a local folder): 36 train images in shards of
    about 5 KB (a few images each), blocks of 2 shards."""
    base = tmp_path_factory.mktemp("packed")
    tree = write_jpeg_tree(base / "tree")
    dest = base / "packed"
    pack(tree, str(dest), shard_mb=0.005, block_shards=2)
    return tree, dest


def dataset(root: Path | str, tmp_path: Path, **kwargs: object) -> PackedDataset:
    return PackedDataset(str(root), cache_dir=str(tmp_path / "cache"), **kwargs)  # type: ignore[arg-type]


def test_pack_keeps_every_image_as_is_with_counts_checksums_and_classes(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    tree, dest = packed
    index = read_index(open_storage(str(dest)))
    assert index.classes == CLASSES
    assert len(index.splits["train"]) > 3 and index.block_shards == 2
    assert sum(e.samples for e in index.splits["train"]) == 36
    assert sum(e.samples for e in index.splits["val"]) == 12
    assert not (dest / "pack-journal.json").exists()
    files = {p.read_bytes(): CLASSES.index(p.parent.name) for p in tree.glob("train/*/*.jpg")}
    train = dataset(dest, tmp_path)
    seen = {}
    for i in range(len(train)):
        s = int(train.shard_of(np.array([i]))[0])
        shard = train._shard(s)
        local = i - int(train.offsets[s])
        seen[shard.image(local)] = int(shard.labels[local])
    assert seen == files  # every JPEG byte for byte, with its label, once
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (32, 32) and 0 <= label < 3


def test_imagenet_and_cifar10_read_packed_data_with_their_transforms(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    stream = StreamOptions(cache_dir=str(tmp_path / "cache"), cache_gb=0.01)
    data = build_datasets("imagenet", packed[1], train_size=30, stream=stream)
    assert (len(data.train), len(data.test), data.num_classes) == (30, 12, 3)
    assert data.train[29][0].shape == data.test[0][0].shape == torch.Size([3, 224, 224])

    cifar = pack(write_cifar_batches(tmp_path / "cifar"), str(tmp_path / "cifar-packed"))
    assert cifar.encoding.startswith("png") and len(cifar.classes) == 10
    data = build_datasets("cifar10", tmp_path / "cifar-packed", stream=stream)
    assert (len(data.train), len(data.test), data.num_classes) == (20, 4, 10)
    image, label = data.train[0]
    assert image.shape == torch.Size([3, 32, 32]) and 0 <= label < 10


def test_the_block_order_is_one_order_at_any_number_of_workers(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    train = dataset(packed[1], tmp_path)
    order = train.epoch_order(seed=5, epoch=1)
    assert sorted(order.tolist()) == list(range(36))
    assert np.array_equal(order, dataset(packed[1], tmp_path).epoch_order(5, 1))
    assert not np.array_equal(order, train.epoch_order(5, 2))
    # blocks of 2 shards: at any point at most 2 shards are begun and not yet finished
    left = dict(enumerate(train.counts))
    for shard in train.shard_of(order).tolist():
        left[shard] -= 1
        assert sum(0 < n < train.counts[s] for s, n in left.items()) <= 2
    keys = train.sample_shards
    single = [sorted(order[b : b + 8].tolist()) for b in range(0, 36, 8)]
    for world in (1, 2, 3):
        steps: dict[int, list[int]] = {}
        for rank in range(world):
            shares = epoch_shares(
                36, 8, seed=5, epoch=1, rank=rank, world=world, order=order, keys=keys
            )
            for share in shares:
                steps.setdefault(share.step, []).extend(share.indices.tolist())
        # each step: the samples of the order at 1 worker, once
        assert [sorted(steps[s]) for s in sorted(steps)] == single


def test_each_worker_reads_only_its_part_of_every_block() -> None:
    """16 shards of 50, blocks of 4, global batch 64 on 4 workers: dealt by shard, a
    worker's samples of an epoch come from about a quarter of the shards."""
    counts = [50] * 16
    keys = np.repeat(np.arange(16), counts)
    order = block_order(counts, 4, seed=0, epoch=0)
    for sort in (False, True):
        read = []
        for rank in range(4):
            shares = epoch_shares(
                800, 64, seed=0, epoch=0, rank=rank, world=4, order=order,
                keys=keys if sort else None,
            )  # fmt: skip
            steps = [set(keys[s.indices].tolist()) for s in shares]
            read.append(statistics.mean(len(shards) for shards in steps))
        if sort:
            assert max(read) <= 2.5  # one shard, or two at a boundary, per step
        else:
            assert min(read) >= 3  # every shard of the block in every step


def test_block_shuffle_mixes_whole_blocks_of_shards() -> None:
    counts = [5, 5, 5, 5, 3]
    order = block_order(counts, 2, seed=0, epoch=0)
    assert sorted(order.tolist()) == list(range(23))
    shard = np.searchsorted(np.cumsum(counts), order, side="right").tolist()
    cuts, seen = [], set()
    for p, s in enumerate(shard):  # a block ends where all shards seen so far are complete
        seen.add(s)
        if p + 1 == sum(counts[t] for t in seen):
            cuts.append(len(seen))
    assert cuts == [2, 4, 5]  # two shards, two more, the last one alone
    assert shard[:10] != sorted(shard[:10])  # the samples of a block are interleaved


def test_a_killed_pack_leaves_no_dataset_and_a_second_run_completes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = write_jpeg_tree(tmp_path / "tree", train=6, val=2)
    dest = tmp_path / "packed"
    written: list[str] = []
    original = PackWriter.put_shard

    def dies_after_three(self: PackWriter, name: str, data: bytes, samples: int) -> object:
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(name)
        return original(self, name, data, samples)

    monkeypatch.setattr(PackWriter, "put_shard", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        pack(tree, str(dest), shard_mb=0.005)
    with pytest.raises(DatasetNotFoundError, match="unfinished: run it again"):
        build_datasets("imagenet", dest, stream=StreamOptions(cache_dir=str(tmp_path / "c")))
    assert not (dest / INDEX_NAME).exists()

    monkeypatch.setattr(PackWriter, "put_shard", original)
    again: list[str] = []
    monkeypatch.setattr(
        PackWriter,
        "put_shard",
        lambda self, name, data, samples: again.append(name) or original(self, name, data, samples),
    )
    index = pack(tree, str(dest), shard_mb=0.005)
    assert not set(again) & set(written)  # the three shards written are reused
    names = [e.name for entries in index.splits.values() for e in entries]
    assert sorted(again + written) == sorted(names)
    assert sum(e.samples for e in index.splits["train"]) == 18
    assert len(PackedDataset(str(dest), cache_dir=str(tmp_path / "c"))) == 18


def test_the_cache_stays_within_its_bound(packed: tuple[Path, Path], tmp_path: Path) -> None:
    index = read_index(open_storage(str(packed[1])))
    largest = max(e.size for e in index.splits["train"])
    bound = 4 * largest / 2**30
    train = dataset(packed[1], tmp_path, cache_gb=bound)
    for i in train.epoch_order(0, 0).tolist():
        train[i]
        cached = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.arrow"))
        assert cached <= 4 * largest
    with pytest.raises(ValueError, match="data_cache_gb=.* must hold two blocks"):
        dataset(packed[1], tmp_path, cache_gb=largest / 2**30)


def test_the_prefetch_fetches_two_blocks_ahead_of_the_loaders_and_no_more(
    packed: tuple[Path, Path], tmp_path: Path
) -> None:
    train = dataset(packed[1], tmp_path)
    order = train.epoch_order(0, 0)
    shard_order = list(dict.fromkeys(train.shard_of(order).tolist()))  # by first need
    shares = epoch_shares(36, 8, seed=0, epoch=0, rank=0, world=1, order=order)
    train.follow(shares)

    def cached() -> list[int]:
        return [s for s in shard_order if train.cache.cached(train.entries[s])]

    deadline = time.monotonic() + 30
    while len(cached()) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    # before any sample was asked for: the first two blocks of 2 shards, nothing beyond
    assert cached() == shard_order[:4]
    for i in order[:12].tolist():  # into the second block
        train[i]
    deadline = time.monotonic() + 30
    while len(cached()) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert cached()[:6] == shard_order[:6]
    train._prefetch.stop()  # type: ignore[union-attr]


# ---- bad data: one line naming the shard or URI ----------------------------------------------


def damaged_copy(src: Path, dest: Path, how: str) -> tuple[Path, str]:
    """A copy of the packed dataset with its first training shard ``how`` damaged; returns
    the copy and the shard's file name."""
    import shutil

    shutil.copytree(src, dest)
    shard = sorted((dest / "train").glob("*.arrow"))[0]
    data = shard.read_bytes()
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    else:  # corrupt: same size, one byte changed
        shard.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    return dest, f"train/{shard.name}"


@pytest.mark.parametrize(
    ("how", "error"),
    [
        ("missing", ShardMissingError),
        ("truncated", ShardCorruptError),
        ("corrupt", ShardCorruptError),
    ],
)
def test_a_bad_shard_ends_in_one_line_naming_it_before_any_sample_is_used(
    packed: tuple[Path, Path], tmp_path: Path, how: str, error: type[Exception]
) -> None:
    root, shard = damaged_copy(packed[1], tmp_path / "bad", how)
    train = dataset(root, tmp_path)
    with pytest.raises(error) as caught:
        train[0]
    message = str(caught.value)
    assert f"{root}/{shard}" in message and "\n" not in message
    assert not train._open  # nothing of the shard was opened
    # from a data-loader process: the same one line
    loader = DataLoader(train, batch_size=4, num_workers=1, collate_fn=list)
    with pytest.raises(error) as caught:
        next(iter(loader))
    assert str(caught.value) == message
    # before a run: probe_packed fetches and verifies the first shard
    with pytest.raises(error, match=shard):
        probe_packed(str(root))


def test_cli_refuses_a_bad_shard_before_training(
    packed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, shard = damaged_copy(packed[1], tmp_path / "bad", "corrupt")
    code = cli.main(
        ["train", "--preset", "imagenet_resnet50", "--data-root", str(root), "--no-progress",
         "--storage", str(tmp_path / "runs"), "--data-cache-dir", str(tmp_path / "cache")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: shard ") and shard in err
    assert len(err.splitlines()) == 1


def test_a_changed_index_is_caught(packed: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "changed"
    shutil.copytree(packed[1], root)
    index = json.loads((root / INDEX_NAME).read_text())
    index["splits"]["train"][0]["sha256"] = "0" * 64
    (root / INDEX_NAME).write_text(json.dumps(index))
    changed = dataset(root, tmp_path)
    first = changed.entries[0].name
    with pytest.raises(ShardCorruptError, match=f"shard {root}/{first} has sha256"):
        changed[0]
    # a checkpoint of the original dataset refuses the changed one, naming both
    original = dataset(packed[1], tmp_path)
    assert changed.fingerprint != original.fingerprint
    train = preset("imagenet_resnet50").replace(data_root=str(packed[1]))
    meta = {
        "kind": METADATA_KIND,
        "version": METADATA_VERSION,
        "train": json.loads(json.dumps(train.to_dict())),
        "data_fingerprint": original.fingerprint,
    }
    check_resumable(meta, train.replace(data_root="/moved/copy"), original.fingerprint)
    with pytest.raises(ConfigError) as caught:
        check_resumable(meta, train.replace(data_root=str(root)), changed.fingerprint)
    message = str(caught.value)
    assert str(root) in message and str(packed[1]) in message
    assert changed.fingerprint[:16] in message and original.fingerprint[:16] in message


def test_an_unreachable_bucket_fails_within_seconds_naming_the_uri(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    began = time.monotonic()
    options = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}
    with pytest.raises(StorageUnreachableError, match="s3://nowhere-bucket/imagenet"):
        probe_packed("s3://nowhere-bucket/imagenet", options)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    code = cli.main(
        ["fit", "--preset", "imagenet_resnet50", "--data-root", "s3://nowhere-bucket/imagenet",
         "--s3-endpoint", "http://127.0.0.1:9", "--storage", str(tmp_path), "--no-progress"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "s3://nowhere-bucket/imagenet" in err and len(err.splitlines()) == 1
    assert time.monotonic() - began < 60  # bounded retries, not minutes (no Ray started)


def test_pack_to_s3_with_the_cli_and_stream_it_back(
    seaweedfs: SeaweedFS, s3_prefix: str, packed: tuple[Path, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    options = seaweedfs.storage_options
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options["secret"])
    code = cli.main(
        ["data", "pack", str(packed[0]), s3_prefix, "--shard-mb", "0.005", "--block-shards",
         "2", "--s3-endpoint", seaweedfs.endpoint_url, "--no-progress"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "train: 36 images" in out and s3_prefix in out
    local = dataset(packed[1], tmp_path / "local")
    remote = PackedDataset(s3_prefix, storage_options=options, cache_dir=str(tmp_path / "s3"))
    assert remote.fingerprint == local.fingerprint  # the same pack, byte for byte
    order = remote.epoch_order(0, 0)
    assert np.array_equal(order, local.epoch_order(0, 0))
    for i in order[:10].tolist():
        assert np.array_equal(np.asarray(remote[i][0]), np.asarray(local[i][0]))
    assert probe_packed(s3_prefix, options).fingerprint == local.fingerprint


def test_the_cifar_job_trains_and_evaluates_from_a_packed_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pack(write_cifar_batches(tmp_path / "cifar"), str(tmp_path / "packed"))
    code = cli.main(
        ["train", "--preset", "cifar10_resnet20", "--data-root", str(tmp_path / "packed"),
         "--epochs", "1", "--global-batch", "10", "--update-interval", "1", "--precision", "fp32",
         "--no-progress",
         "--storage", str(tmp_path / "runs"), "--name", "cifar", "--evaluate-checkpoint",
         "--data-cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "test accuracy of the sparse model" in out
    checkpoint = load_sparse(str(tmp_path / "runs" / "cifar" / "checkpoint_epoch_0001"))
    index = read_index(open_storage(str(tmp_path / "packed")))
    assert checkpoint.metadata["data_fingerprint"] == index.fingerprint
