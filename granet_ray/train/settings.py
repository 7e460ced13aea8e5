"""Where and how a Ray Train run executes (``RunSettings``), and the storage it writes to.

Storage is a local folder or ``s3://bucket/prefix``. For an S3-compatible endpoint,
``storage_options`` (the store's s3fs options: ``endpoint_url``, ``key``, ``secret``,
``token``) also become the pyarrow filesystem Ray Train persists checkpoints through.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs

from granet_ray.config import ConfigError, TrainConfig

STORAGE_ENV = "GRANET_RAY_STORAGE"
S3_OPTION_KEYS = ("endpoint_url", "key", "secret", "token")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def default_storage_path() -> str:
    """``$GRANET_RAY_STORAGE`` or ``~/granet-ray/runs``, made absolute when local."""
    path = os.environ.get(STORAGE_ENV) or "~/granet-ray/runs"
    return path if is_s3(path) else os.path.abspath(os.path.expanduser(path))


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{field_name}={value!r} is invalid: must be {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RunSettings:
    """Where and how a run executes.

    num_workers: Ray Train workers (one process each). gpus_per_worker: > 0 trains on CUDA
    with NCCL (and AMP when ``TrainConfig.amp``); 0 on CPU with gloo. storage_path: a local
    folder (made absolute) or ``s3://bucket/prefix``. storage_options: S3 credentials and
    endpoint (keys ``endpoint_url``, ``key``, ``secret``, ``token``). name: the run's folder
    under storage_path (None: a unique generated name; an existing name resumes that run).
    checkpoint_every: epochs between checkpoints (one is always written at the end).
    max_failures: worker-group failures to recover from the latest checkpoint (-1: no limit).
    """

    num_workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    storage_path: str = field(default_factory=default_storage_path)
    storage_options: dict[str, Any] | None = None
    name: str | None = None
    checkpoint_every: int = 1
    max_failures: int = 0

    def __post_init__(self) -> None:
        if not (_is_int(self.num_workers) and self.num_workers >= 1):
            _fail("num_workers", self.num_workers, "a positive integer")
        if not (_is_number(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            _fail("gpus_per_worker", self.gpus_per_worker, "a number >= 0")
        if not (_is_number(self.cpus_per_worker) and self.cpus_per_worker > 0):
            _fail("cpus_per_worker", self.cpus_per_worker, "a number > 0")
        if not (isinstance(self.storage_path, str) and self.storage_path):
            _fail("storage_path", self.storage_path, "a local folder or s3://bucket/prefix")
        scheme = urlparse(self.storage_path).scheme
        if is_s3(self.storage_path):
            if not urlparse(self.storage_path).netloc:
                _fail("storage_path", self.storage_path, "s3://bucket[/prefix] with a bucket")
        elif scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
            _fail("storage_path", self.storage_path, "a local folder or s3://bucket/prefix")
        else:
            path = os.path.abspath(os.path.expanduser(self.storage_path))
            object.__setattr__(self, "storage_path", path)
        if self.storage_options is not None:
            if not isinstance(self.storage_options, dict):
                _fail("storage_options", self.storage_options, "a dict or None")
            unknown = sorted(set(self.storage_options) - set(S3_OPTION_KEYS))
            if unknown:
                _fail("storage_options", unknown, f"keys among {', '.join(S3_OPTION_KEYS)}")
            if not is_s3(self.storage_path):
                _fail("storage_options", "...", "None unless storage_path is s3://...")
        if self.name is not None and not (isinstance(self.name, str) and _NAME.match(self.name)):
            _fail("name", self.name, "None or letters, digits, '_', '.', '-' (no '/')")
        if not (_is_int(self.checkpoint_every) and self.checkpoint_every >= 1):
            _fail("checkpoint_every", self.checkpoint_every, "a positive integer of epochs")
        if not (_is_int(self.max_failures) and self.max_failures >= -1):
            _fail("max_failures", self.max_failures, "an integer >= -1 (-1: no limit)")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> RunSettings:
        return dataclasses.replace(self, **changes)


def run_name(train: TrainConfig) -> str:
    """A unique run name: ``granet-<model>-<method>-<UTC time>-<4 hex>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"granet-{train.model}-{train.granet.method}-{stamp}-{secrets.token_hex(2)}"


def storage_filesystem(run: RunSettings) -> pyarrow.fs.FileSystem | None:
    """The pyarrow filesystem for ``RunConfig.storage_filesystem``: an S3 filesystem built from
    ``storage_options`` (custom endpoint, keys), or None to let Ray resolve the path."""
    options = run.storage_options
    if not is_s3(run.storage_path) or not options:
        return None
    kwargs: dict[str, Any] = {}
    if options.get("key") is not None:
        kwargs["access_key"] = options["key"]
        kwargs["secret_key"] = options.get("secret")
        kwargs["session_token"] = options.get("token")
    endpoint = options.get("endpoint_url")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pyarrow.fs.S3FileSystem(**kwargs)


def ray_storage_path(run: RunSettings) -> str:
    """``RunConfig.storage_path``: without the ``s3://`` scheme when ``storage_filesystem``
    gives the filesystem (Ray then wants a path on it)."""
    if is_s3(run.storage_path) and run.storage_options:
        return run.storage_path.removeprefix("s3://")
    return run.storage_path


def run_uri(run: RunSettings) -> str:
    """The run's folder (checkpoints, history, plot): ``<storage_path>/<name>``."""
    if run.name is None:
        raise ValueError("the run has no name yet")
    return f"{run.storage_path.rstrip('/')}/{run.name}"


def storage_uri(run: RunSettings, fs_path: str) -> str:
    """The store URI of a path on the run's storage (as Ray reports it: a local path, or
    ``bucket/key`` on S3)."""
    if is_s3(run.storage_path):
        return fs_path if is_s3(fs_path) else "s3://" + fs_path.lstrip("/")
    return fs_path
