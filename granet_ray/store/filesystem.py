"""Where checkpoints live: URI parsing and a flat-directory storage on local disk or S3.

A ``Storage`` is one directory (local folder or S3 prefix). Data files are written once under
fresh names; ``commit`` replaces a file atomically (local: temp file, fsync, os.replace, fsync of
the directory; S3: a single PUT). S3 goes through fsspec / s3fs; its failures become typed
errors that carry the URI and the endpoint.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from granet_ray.store.errors import (
    BucketNotFoundError,
    CheckpointError,
    InvalidURIError,
    StorageAuthError,
    StorageError,
    StorageUnreachableError,
)

BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")


@dataclass(frozen=True)
class Location:
    """A parsed URI. scheme: "file" or "s3"; path: absolute local path, or "bucket/key"."""

    scheme: str
    path: str

    @property
    def uri(self) -> str:
        """The canonical URI: an absolute local path or ``s3://bucket/key``."""
        return self.path if self.scheme == "file" else f"s3://{self.path}"

    def child(self, relative: str) -> Location:
        """The location of a sub-directory given as a relative POSIX path ('' = itself)."""
        if not relative:
            return self
        if self.scheme == "file":
            return Location("file", str(Path(self.path, *relative.split("/"))))
        return Location("s3", f"{self.path}/{relative}")


def parse_uri(uri: str | os.PathLike[str]) -> Location:
    """Parse a local path, ``file://`` URI or ``s3://bucket/prefix``; InvalidURIError if bad."""
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidURIError(f"invalid checkpoint URI {uri!r}: expected a non-empty string")
    if "\x00" in uri:
        raise InvalidURIError(f"invalid checkpoint URI {uri!r}: contains a NUL character")
    if "://" not in uri:
        return Location("file", os.path.abspath(os.path.expanduser(uri)))
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        raise InvalidURIError(f"invalid checkpoint URI {uri!r}: no query or fragment allowed")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidURIError(
                f"invalid checkpoint URI {uri!r}: file:// URIs must be local (got host "
                f"{parts.netloc!r})"
            )
        if not parts.path:
            raise InvalidURIError(f"invalid checkpoint URI {uri!r}: empty path")
        return Location("file", os.path.abspath(parts.path))
    if scheme in ("s3", "s3a"):
        bucket = parts.netloc
        if not BUCKET_RE.match(bucket):
            raise InvalidURIError(
                f"invalid checkpoint URI {uri!r}: bucket {bucket!r} must be 3-63 letters, "
                "digits, '.', '-' or '_'"
            )
        segments = [s for s in parts.path.split("/") if s]
        if any(s in (".", "..") for s in segments) or "\\" in parts.path:
            raise InvalidURIError(f"invalid checkpoint URI {uri!r}: '.', '..' or '\\' in key")
        return Location("s3", "/".join([bucket, *segments]))
    raise InvalidURIError(
        f"unsupported checkpoint URI {uri!r}: scheme {parts.scheme!r}; use a local path, "
        "file:///path or s3://bucket/prefix"
    )


class Storage(ABC):
    """One checkpoint directory; names are plain file names inside it."""

    def __init__(self, location: Location) -> None:
        self.location = location

    @property
    def uri(self) -> str:
        """The directory's canonical URI."""
        return self.location.uri

    @abstractmethod
    def sub(self, relative: str) -> Storage:
        """The storage of a sub-directory (relative POSIX path)."""

    @abstractmethod
    def read(self, names: dict[str, int]) -> dict[str, bytes | None]:
        """Read each file, at most ``names[name]`` bytes of it; None for a missing file."""

    @abstractmethod
    def write(self, files: dict[str, bytes]) -> None:
        """Create new files (never replacing one) and make them durable."""

    @abstractmethod
    def commit(self, name: str, data: bytes) -> None:
        """Atomically create or replace one file: readers see the old or the new bytes."""

    @abstractmethod
    def remove(self, names: list[str]) -> None:
        """Delete files; missing ones are ignored."""

    @abstractmethod
    def scan(self, marker: str) -> dict[str, dict[str, int]]:
        """Sub-directories (relative POSIX paths, '' = this one) holding a file named
        ``marker``, each with the byte sizes of its files."""


class LocalStorage(Storage):
    """A folder on local disk."""

    def sub(self, relative: str) -> LocalStorage:
        return LocalStorage(self.location.child(relative))

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise StorageError(f"cannot {action} in {self.uri}: {exc.strerror or exc}") from None

    def read(self, names: dict[str, int]) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        with self._errors("read"):
            for name, limit in names.items():
                try:
                    with open(os.path.join(self.location.path, name), "rb") as f:
                        out[name] = f.read(limit)
                except (FileNotFoundError, NotADirectoryError):
                    out[name] = None
        return out

    def write(self, files: dict[str, bytes]) -> None:
        with self._errors("write"):
            os.makedirs(self.location.path, exist_ok=True)
            for name, data in files.items():
                with open(os.path.join(self.location.path, name), "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())

    def commit(self, name: str, data: bytes) -> None:
        with self._errors("commit"):
            os.makedirs(self.location.path, exist_ok=True)
            final = os.path.join(self.location.path, name)
            temp = os.path.join(self.location.path, f".{name}.{secrets.token_hex(6)}.tmp")
            with open(temp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
            fd = os.open(self.location.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def remove(self, names: list[str]) -> None:
        with self._errors("delete files"):
            for name in names:
                with suppress(FileNotFoundError):
                    os.remove(os.path.join(self.location.path, name))

    def scan(self, marker: str) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        root = self.location.path
        with self._errors("list files"):
            for dirpath, _, filenames in os.walk(root):
                if marker not in filenames:
                    continue
                relative = os.path.relpath(dirpath, root)
                sizes = {}
                for name in filenames:
                    try:
                        sizes[name] = os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:
                        continue
                found["" if relative == "." else relative.replace(os.sep, "/")] = sizes
        return found


def _endpoint(options: dict[str, Any]) -> str:
    client = options.get("client_kwargs") or {}
    return (
        options.get("endpoint_url")
        or client.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "the default AWS endpoint"
    )


def s3_error(exc: BaseException, uri: str, endpoint: str) -> CheckpointError | None:
    """The typed error for an s3fs / botocore failure, or None for a plain missing key."""
    import aiohttp
    import botocore.exceptions as bex

    detail = str(exc) or type(exc).__name__
    cause = exc.__cause__
    code = ""
    if isinstance(cause, bex.ClientError):
        code = cause.response.get("Error", {}).get("Code", "")
    if isinstance(
        exc,
        (
            bex.EndpointConnectionError,
            bex.ConnectTimeoutError,
            bex.ReadTimeoutError,
            aiohttp.ClientConnectionError,
            ConnectionError,
            asyncio.TimeoutError,
            TimeoutError,
        ),
    ):
        return StorageUnreachableError(f"cannot reach S3 endpoint {endpoint} for {uri}: {detail}")
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return StorageAuthError(
            f"no S3 credentials for {uri} at {endpoint}: set storage_options key / secret or "
            "the AWS environment / config"
        )
    if isinstance(exc, PermissionError):
        return StorageAuthError(
            f"S3 endpoint {endpoint} refused access to {uri} ({code or 'AccessDenied'}: "
            f"{detail}); check the credentials"
        )
    if isinstance(exc, FileNotFoundError):
        if code == "NoSuchBucket" or "bucket does not exist" in detail.lower():
            bucket = uri.removeprefix("s3://").split("/", 1)[0]
            return BucketNotFoundError(f"bucket {bucket!r} does not exist at {endpoint} ({uri})")
        return None
    if isinstance(exc, ValueError) and "endpoint" in detail.lower():
        return InvalidURIError(f"invalid S3 endpoint for {uri}: {detail}")
    if isinstance(exc, TypeError) and "keyword argument" in detail:
        return InvalidURIError(f"invalid storage_options for {uri}: {detail}")
    return StorageError(
        f"S3 request for {uri} at {endpoint} failed: {type(exc).__name__}: {detail}"
    )


class S3Storage(Storage):
    """An S3 prefix, through s3fs (credentials from ``storage_options`` or the AWS defaults)."""

    def __init__(self, location: Location, fs: Any, endpoint: str) -> None:
        super().__init__(location)
        self.fs = fs
        self.endpoint = endpoint

    def sub(self, relative: str) -> S3Storage:
        return S3Storage(self.location.child(relative), self.fs, self.endpoint)

    def _key(self, name: str) -> str:
        return f"{self.location.path}/{name}"

    def _raise(self, exc: BaseException) -> None:
        mapped = s3_error(exc, self.uri, self.endpoint)
        if mapped is not None:
            raise mapped from None

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except CheckpointError:
            raise
        except Exception as exc:  # s3fs and botocore raise many unrelated types
            self._raise(exc)
            raise StorageError(f"S3 object not found under {self.uri}: {exc}") from None

    def read(self, names: dict[str, int]) -> dict[str, bytes | None]:
        keys = [self._key(n) for n in names]
        with self._errors():
            results = self.fs.cat_ranges(
                keys, [0] * len(keys), list(names.values()), on_error="return"
            )
        out: dict[str, bytes | None] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, OSError) and "range is not satisfiable" in str(result):
                out[name] = b""  # S3 answers a ranged GET of an empty object with 416
            elif isinstance(result, BaseException):
                self._raise(result)
                out[name] = None
            else:
                out[name] = bytes(result)
        return out

    def write(self, files: dict[str, bytes]) -> None:
        with self._errors():
            self.fs.pipe({self._key(n): data for n, data in files.items()})

    def commit(self, name: str, data: bytes) -> None:
        with self._errors():
            self.fs.pipe_file(self._key(name), data)

    def remove(self, names: list[str]) -> None:
        if names:
            with self._errors():
                self.fs.rm([self._key(n) for n in names])

    def scan(self, marker: str) -> dict[str, dict[str, int]]:
        with self._errors():
            listing = self.fs.find(self.location.path, detail=True)
        by_dir: dict[str, dict[str, int]] = {}
        root = self.location.path
        for key, info in listing.items():
            if not key.startswith(root + "/"):
                continue
            parent, _, name = key[len(root) + 1 :].rpartition("/")
            by_dir.setdefault(parent, {})[name] = int(info.get("size", 0))
        return {d: sizes for d, sizes in by_dir.items() if marker in sizes}


def open_storage(
    uri: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> Storage:
    """The storage for a URI. ``storage_options`` go to ``s3fs.S3FileSystem`` (key, secret,
    endpoint_url, client_kwargs, config_kwargs, ...) and are refused for local paths."""
    location = parse_uri(uri)
    if location.scheme == "file":
        if storage_options:
            raise InvalidURIError(
                f"storage_options apply to s3:// URIs only, got {sorted(storage_options)} for "
                f"the local path {location.uri}"
            )
        return LocalStorage(location)
    if storage_options is not None and not isinstance(storage_options, dict):
        raise InvalidURIError(f"storage_options must be a dict, got {type(storage_options)}")
    import s3fs

    options = {"use_listings_cache": False, **(storage_options or {})}
    endpoint = _endpoint(options)
    try:
        fs = s3fs.S3FileSystem(**options)
    except (TypeError, ValueError) as exc:
        raise InvalidURIError(f"invalid storage_options for {location.uri}: {exc}") from None
    return S3Storage(location, fs, endpoint)
