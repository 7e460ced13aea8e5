"""The ImageNet job streaming a packed dataset from S3 (SeaweedFS) on Ray Train workers: real
JPEG files packed to S3, 2 workers, a killed worker, then a resize to 1 worker; the
per-sample log shows every sample once per epoch, each step exactly the samples of the
order at 1 worker; the checkpoint records the dataset's fingerprint and another dataset is
refused naming both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from images import write_jpeg_tree

from granet_ray.config import ConfigError, RunSettings, TrainConfig, override, preset
from granet_ray.data.pack import pack
from granet_ray.data.packed import PackedDataset
from granet_ray.data.sharding import epoch_shares
from granet_ray.local import fit_local
from granet_ray.store import latest_checkpoint, load_sparse
from granet_ray.testing.hooks import CrashAt, SampleLog, audit
from granet_ray.testing.seaweedfs import SeaweedFS
from granet_ray.train import fit

# 24 training JPEGs (3 classes) in shards of 3 or 4, blocks of 2 shards; global batch 8:
# 3 steps per epoch, 6 in all. ResNet-20 keeps the CPU time small; the data path (packed
# ImageNet, RandomResizedCrop 224) is the ImageNet job's.
SIZES = {"epochs": 2, "global_batch": 8, "granet.update_interval": 2}


def imagenet_job(data_root: str) -> TrainConfig:
    """The ImageNet job's recipe at test size, on ``data_root``."""
    base = preset("imagenet_resnet50")
    changes = {**SIZES, "model": "resnet20", "precision": "fp32", "data_root": data_root}
    return override(base, changes)


def test_imagenet_job_streams_from_s3_and_resumes_at_the_right_sample(
    ray_session: None, seaweedfs: SeaweedFS, s3_prefix: str, tmp_path: Path
) -> None:
    options = seaweedfs.storage_options
    tree = write_jpeg_tree(tmp_path / "tree", train=8, val=2)
    index = pack(tree, s3_prefix, storage_options=options, shard_mb=0.0045, block_shards=2)
    assert len(index.splits["train"]) >= 4
    train = imagenet_job(s3_prefix)
    settings = RunSettings(
        num_workers=2,
        storage_path=str(tmp_path / "runs"),
        name="stream",
        checkpoint_every_steps=1,
        max_failures=1,
        data_options=options,
        data_cache_dir=str(tmp_path / "cache"),
    )
    samples = str(tmp_path / "samples")
    # worker 1 dies after step 2 (the group restarts from step 1's checkpoint), worker 0
    # after step 5: past max_failures, the run stops with step 4 committed
    hooks = [
        SampleLog(samples),
        CrashAt(2, str(tmp_path / "crash-1"), rank=1),
        CrashAt(5, str(tmp_path / "crash-2"), rank=0),
    ]
    with pytest.raises(Exception):  # noqa: B017  (Ray's TrainingFailedError)
        fit(train, settings, progress=False, summary=False, hooks=hooks)
    assert latest_checkpoint(settings.run_uri).endswith("checkpoint_epoch_0001_step_0001")
    # the run goes on with 1 worker: a resize, mid-epoch
    outcome = fit(
        train, settings.replace(num_workers=1), progress=False, summary=False, hooks=hooks
    )
    assert outcome.metrics["step"] == 6

    dataset = PackedDataset(s3_prefix, storage_options=options, cache_dir=str(tmp_path / "c"))
    log = audit(samples)
    assert sorted(log) == [0, 1]
    for epoch, steps in log.items():
        order = dataset.epoch_order(train.seed, epoch)
        shares = epoch_shares(24, 8, seed=train.seed, epoch=epoch, rank=0, world=1, order=order)
        expected = {epoch * 3 + s.step + 1: sorted(s.indices.tolist()) for s in shares}
        assert steps == expected  # each step: the samples of the order at 1 worker
        seen = np.concatenate([steps[s] for s in steps])
        assert sorted(seen.tolist()) == list(range(24))  # every sample once per epoch
    worlds = {}
    for path in Path(samples).glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            worlds[record["step"]] = record["world"]
    assert worlds[1] == 2 and worlds[6] == 1

    checkpoint = load_sparse(outcome.checkpoint_uri)
    assert checkpoint.metadata["data_fingerprint"] == index.fingerprint
    assert [r["new_size"] for r in checkpoint.metadata["resizes"]] == [1]

    # the same run on another packed dataset (the same images in other shards) is refused
    other = f"{s3_prefix}-other"
    moved = pack(tree, other, storage_options=options, shard_mb=0.01, block_shards=2)
    with pytest.raises(ConfigError) as caught:
        fit_local(imagenet_job(other), settings, device="cpu", progress=False, summary=False)
    message = str(caught.value)
    assert f"{s3_prefix}'" in message and f"{other}'" in message
    assert index.fingerprint[:16] in message and moved.fingerprint[:16] in message
