"""Preflight: the run's own builders catch a bad configuration before any worker starts, and
the storage probe catches unreachable, unauthorized and unwritable storage."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from granet_ray.checks import check_storage, preflight
from granet_ray.config import ConfigError, RunSettings, preset
from granet_ray.store import StorageAuthError, StorageError, StorageUnreachableError
from granet_ray.testing.ports import free_port
from granet_ray.testing.seaweedfs import SeaweedFS


def test_preflight_runs_the_real_checks_and_returns_the_plan() -> None:
    plan = preflight(preset("mnist_demo"), 2)
    assert plan is not None and (plan.steps_per_epoch, plan.total_steps) == (31, 248)
    assert preflight(preset("mnist_demo"), 8) == plan  # the plan does not depend on workers
    with pytest.raises(ConfigError, match="model='resnet18' is invalid"):
        preflight(preset("mnist_demo").replace(model="resnet18"), 2)
    with pytest.raises(ConfigError, match="dataset='mnist' is invalid"):
        preflight(preset("mnist_demo").replace(dataset="mnist"), 2)
    with pytest.raises(ConfigError, match="data_root=None is invalid"):
        preflight(preset("cifar10_resnet20"), 2)
    with pytest.raises(ConfigError, match="model='resnet20' does not accept dataset='mnist5k'"):
        preflight(preset("mnist_demo").replace(model="resnet20"), 2)
    # 4000 samples, global batch 1024: 4 steps per epoch, no update in a 4-epoch window of 40
    with pytest.raises(ConfigError, match="hold no mask update.*--update-interval"):
        preflight(
            preset("mnist_demo").replace(global_batch=1024, granet={"update_interval": 40}), 2
        )
    with pytest.raises(ConfigError, match="^global_batch=4 is invalid: every one of the 8"):
        preflight(preset("mnist_demo").replace(global_batch=4), 8)
    with pytest.raises(ConfigError, match="^sync_bn=True is invalid"):
        preflight(preset("mnist_demo").replace(sync_bn=True), 2)
    preflight(preset("mnist_demo").replace(sync_bn=True), 2, True)  # on GPU workers


def test_worker_only_data_is_not_read_on_the_driver() -> None:
    assert preflight(preset("imagenet_resnet50").replace(data_root="/nowhere"), 8) is None


def test_storage_probe_accepts_a_writable_folder(tmp_path: Path) -> None:
    check_storage(RunSettings(storage_path=str(tmp_path / "runs")))
    assert list((tmp_path / "runs").iterdir()) == []  # the probe object is gone


@pytest.mark.parametrize("where", ["/proc/granet-probe", "file"])
def test_storage_probe_rejects_an_unwritable_folder(where: str, tmp_path: Path) -> None:
    if where == "file":
        (tmp_path / "file").write_text("x")
        where = str(tmp_path / "file" / "runs")
    with pytest.raises(StorageError, match="cannot"):
        check_storage(RunSettings(storage_path=where))


def test_storage_probe_on_s3(seaweedfs: SeaweedFS, s3_prefix: str) -> None:
    good = seaweedfs.storage_options
    check_storage(RunSettings(storage_path=s3_prefix, storage_options=good))
    wrong = {**good, "secret": "wrong"}
    with pytest.raises(StorageAuthError):
        check_storage(RunSettings(storage_path=s3_prefix, storage_options=wrong))
    closed = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError):
        check_storage(
            RunSettings(storage_path=s3_prefix, storage_options={**good, "endpoint_url": closed})
        )
    assert time.monotonic() - start < 15
