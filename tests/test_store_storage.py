"""The storage layer: plain objects, the storage probe and Ray Train's pyarrow filesystem, on a
local folder and on SeaweedFS (S3)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from fixtures_s3 import S3_TEST_BUCKET, StorageRoot

from granet_ray.store import (
    BucketNotFoundError,
    InvalidURIError,
    Storage,
    StorageAuthError,
    StorageError,
    StorageUnreachableError,
    open_storage,
)
from granet_ray.testing.ports import free_port

BINARY = bytes(range(256)) * 9 + b"\x00\xff"


@pytest.fixture
def storage(storage_root: StorageRoot) -> Storage:
    return open_storage(storage_root.base, storage_root.options)


def test_put_get_list_delete_round_trip(storage: Storage) -> None:
    assert storage.list() == {}
    assert storage.get("history.json") is None
    storage.put("history.json", b'{"epochs": []}')
    storage.put("sweep/results/trials.csv", b"a,b\n1,2\n")
    storage.put("sweep/results/pareto.png", BINARY)
    storage.put("sweep/empty", b"")
    assert storage.get("history.json") == b'{"epochs": []}'
    assert storage.get("sweep/results/pareto.png") == BINARY
    assert storage.get("sweep/empty") == b""
    for missing in ("nope", "sweep/nope", "sweep/results", "history.json/below"):
        assert storage.get(missing) is None, missing
    storage.put("history.json", b"replaced")
    assert storage.get("history.json") == b"replaced"
    everything = {
        "history.json": 8,
        "sweep/empty": 0,
        "sweep/results/pareto.png": len(BINARY),
        "sweep/results/trials.csv": 8,
    }
    assert storage.list() == everything
    assert list(storage.list()) == sorted(everything)
    assert storage.sub("sweep").list() == {
        "empty": 0,
        "results/pareto.png": len(BINARY),
        "results/trials.csv": 8,
    }
    assert storage.sub("nothing/here").list() == {}
    assert storage.sub("sweep/results").list() == {"pareto.png": len(BINARY), "trials.csv": 8}
    assert storage.sub("sweep").get("results/trials.csv") == b"a,b\n1,2\n"
    assert storage.get("sweep/results/pareto.png", 4) == BINARY[:4]
    assert storage.get_many({"history.json": None, "sweep/empty": 5, "nope": 1}) == {
        "history.json": b"replaced",
        "sweep/empty": b"",
        "nope": None,
    }
    storage.delete("sweep/results/pareto.png")
    storage.delete("sweep/results/pareto.png")  # missing is fine
    storage.delete("never/was", "history.json")
    assert storage.get("sweep/results/pareto.png") is None
    assert list(storage.list()) == ["sweep/empty", "sweep/results/trials.csv"]


def test_list_skips_half_written_local_objects(tmp_path: Path) -> None:
    storage = open_storage(tmp_path)
    storage.put("a.json", b"{}")
    (tmp_path / ".b.json.0123456789ab.tmp").write_bytes(b"half")  # a put killed mid-way
    assert storage.list() == {"a.json": 2}


@pytest.mark.parametrize("name", ["", "../escape", "/abs", "a//b", "a/./b", "a\\b", "x\x00"])
def test_object_names_stay_inside(storage: Storage, name: str) -> None:
    for call in (
        lambda: storage.put(name, b"x"),
        lambda: storage.get(name),
        lambda: storage.delete(name),
        lambda: storage.get_many({"ok": None, name: None}),
        lambda: storage.put_new({name: b"x"}),
    ):
        with pytest.raises(InvalidURIError, match=rf"invalid object name .* under {storage.uri}"):
            call()


def test_put_new_and_rename(storage: Storage, storage_root: StorageRoot) -> None:
    folder = storage.sub("ck")
    folder.put_new({"a.arrow": b"a", "sub/b.arrow": BINARY})
    if storage_root.kind == "local":  # S3 has no create-if-absent: fresh names avoid it
        with pytest.raises(StorageError, match=rf"cannot write in {folder.uri}: File exists"):
            folder.put_new({"a.arrow": b"other"})
    moved = folder.rename("ck.old")
    assert moved is not None and moved.uri == storage.sub("ck.old").uri
    assert storage.list() == {"ck.old/a.arrow": 1, "ck.old/sub/b.arrow": len(BINARY)}
    assert folder.rename("ck.gone") is None  # nothing left to move
    storage.put("taken/x", b"x")
    with pytest.raises(StorageError, match=r"cannot rename to .*/taken in .*/ck\.old: "):
        moved.rename("taken")
    assert storage.list() == {
        "ck.old/a.arrow": 1,
        "ck.old/sub/b.arrow": len(BINARY),
        "taken/x": 1,
    }


def test_probe_succeeds_and_leaves_nothing(storage: Storage) -> None:
    storage.probe()
    storage.sub("not/yet/there").probe()
    assert storage.list() == {}


# ---------------------------------------------------------------- probe failures


def test_probe_of_an_unreachable_endpoint_fails_fast() -> None:
    port = free_port()  # nothing listens on it
    options = {"key": "k", "secret": "s", "endpoint_url": f"http://127.0.0.1:{port}"}
    storage = open_storage("s3://bucket/runs", options)
    start = time.monotonic()
    with pytest.raises(StorageUnreachableError) as info:
        storage.probe()
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert f"cannot reach S3 endpoint http://127.0.0.1:{port} for s3://bucket/runs" in message
    assert "\n" not in message


def test_probe_with_a_wrong_secret(seaweedfs, s3_prefix: str) -> None:
    wrong = {**seaweedfs.storage_options, "secret": "wrong-secret"}
    with pytest.raises(
        StorageAuthError,
        match=rf"{seaweedfs.endpoint_url} refused access to {s3_prefix} .*check the credentials",
    ):
        open_storage(s3_prefix, wrong).probe()


def test_probe_of_a_missing_bucket(seaweedfs) -> None:
    with pytest.raises(
        BucketNotFoundError,
        match=rf"bucket 'granet-no-bucket' does not exist at {seaweedfs.endpoint_url} "
        r"\(s3://granet-no-bucket/runs\)",
    ):
        open_storage("s3://granet-no-bucket/runs", seaweedfs.storage_options).probe()


def test_probe_of_local_paths_that_cannot_be_written(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"cannot write to /proc/x \(local disk\): \w+"):
        open_storage("/proc/x").probe()
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(
        StorageError, match=r"cannot write to .*/file/sub \(local disk\): Not a dir"
    ):
        open_storage(tmp_path / "file" / "sub").probe()
    with pytest.raises(StorageError, match=r"cannot write to .*/file \(local disk\): File exists"):
        open_storage(tmp_path / "file").probe()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_probe_of_a_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(StorageError, match=r"cannot write to .*/ro \(local disk\): Permission"):
            open_storage(folder).probe()
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------- Ray Train's filesystem


def test_arrow_filesystem_round_trip(storage: Storage, storage_root: StorageRoot) -> None:
    fs, path = storage.arrow_filesystem()
    if storage_root.kind == "local":
        assert (fs, path) == (None, storage_root.base)
        fs = pafs.LocalFileSystem()
    else:
        assert isinstance(fs, pafs.S3FileSystem)
        assert path == storage_root.base.removeprefix("s3://")
    fs.create_dir(f"{path}/checkpoint_000001", recursive=True)
    with fs.open_output_stream(f"{path}/checkpoint_000001/x.bin") as f:
        f.write(BINARY)
    assert storage.get("checkpoint_000001/x.bin") == BINARY
    storage.put("history.json", b"{}")
    with fs.open_input_stream(f"{path}/history.json") as f:
        assert f.read() == b"{}"
    reported = f"{path}/checkpoint_000001"  # what Ray hands back as checkpoint.path
    uri = storage.uri_of(reported)
    assert uri == storage.sub("checkpoint_000001").uri
    assert open_storage(uri, storage_root.options).get("x.bin") == BINARY
    if storage_root.kind == "s3":
        assert storage.uri_of(f"s3://{reported}") == uri
        assert storage.uri_of(f"/{reported}") == uri


def test_arrow_filesystem_from_storage_options() -> None:
    options = {
        "key": "k",
        "secret": "s",
        "token": "t",
        "endpoint_url": "https://minio.example:9000",
        "config_kwargs": {"retries": {"max_attempts": 1}},  # s3fs tuning, not carried over
    }
    fs, path = open_storage("s3://bucket/runs", options).arrow_filesystem()
    assert path == "bucket/runs"
    assert fs == pafs.S3FileSystem(
        access_key="k",
        secret_key="s",
        session_token="t",
        endpoint_override="minio.example:9000",
        scheme="https",
    )
    local = {"endpoint_url": "http://127.0.0.1:8333"}  # keys from the AWS environment
    fs, _ = open_storage("s3://bucket/runs", local).arrow_filesystem()
    assert fs == pafs.S3FileSystem(endpoint_override="127.0.0.1:8333", scheme="http")
    assert open_storage("s3://bucket/runs").arrow_filesystem() == (None, "s3://bucket/runs")
    assert open_storage("s3://bucket/runs").uri_of("bucket/runs/ck") == "s3://bucket/runs/ck"
    with pytest.raises(InvalidURIError, match=r"\['profile'\] for s3://bucket/runs have no"):
        open_storage("s3://bucket/runs", {"profile": "dev"}).arrow_filesystem()


def test_seaweedfs_helpers_go_through_the_store(seaweedfs) -> None:
    fs = seaweedfs.pyarrow_filesystem()
    assert (
        fs
        == open_storage(f"s3://{S3_TEST_BUCKET}", seaweedfs.storage_options).arrow_filesystem()[0]
    )
    seaweedfs.make_bucket("granet-made")
    seaweedfs.make_bucket("granet-made")  # no error if it exists
    open_storage("s3://granet-made/x", seaweedfs.storage_options).probe()
