"""The only storage code: URI parsing, and one directory on local disk or S3.

A ``Storage`` is one directory (local folder or S3 prefix) holding objects named by relative
POSIX paths ("a/b.json"). One vocabulary: ``get`` / ``get_many`` read, ``put`` creates or
replaces one object atomically (local: temp file, fsync, os.replace, fsync of the directory;
S3: a single PUT), ``put_new`` creates objects that must not exist yet (checkpoint data files),
``delete``, ``list`` and ``rename``. ``probe`` checks a storage before a run uses it, and
``arrow_filesystem`` gives Ray Train the same storage as a pyarrow filesystem. Reads, listings
and deletes go through one fsspec filesystem for both; failures become typed errors that
carry the URI (and, on S3, the endpoint).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from granet_ray.store.errors import (
    BucketNotFoundError,
    CheckpointError,
    InvalidURIError,
    StorageAuthError,
    StorageError,
    StorageUnreachableError,
)

if TYPE_CHECKING:
    import pyarrow.fs

BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")
# put's temp files (".<name>.<12 hex>.tmp"): never listed as objects
TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
PROBE_BYTES = b"granet-ray storage probe\n"
# Bounds for probe(): a dead endpoint fails in seconds instead of minutes of retries. Seconds;
# max_attempts counts the first try. The caller's own config_kwargs win key by key.
PROBE_CONFIG: dict[str, Any] = {
    "connect_timeout": 3,
    "read_timeout": 5,
    "retries": {"max_attempts": 2},
}
# s3fs options that only tune the s3fs client: not carried over to pyarrow's S3FileSystem.
S3FS_ONLY_OPTIONS = frozenset({"config_kwargs", "use_listings_cache", "skip_instance_cache"})
# what a missing local object raises (a folder, or a file where a folder is expected, too)
LOCAL_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


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

    def sibling(self, name: str) -> Location:
        """The location named ``name`` in the same parent directory."""
        if self.scheme == "file":
            return Location("file", os.path.join(os.path.dirname(self.path), name))
        parent = self.path.rpartition("/")[0]
        if not parent:
            raise InvalidURIError(f"{self.uri} is a bucket: it has no sibling {name!r}")
        return Location("s3", f"{parent}/{name}")


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


def object_name(name: Any, where: str) -> str:
    """An object's name: a relative POSIX path ("a/b.json") that stays inside ``where``;
    InvalidURIError otherwise."""
    segments = name.split("/") if isinstance(name, str) else [""]
    if any(s in ("", ".", "..") for s in segments) or "\\" in name or "\x00" in name:
        raise InvalidURIError(
            f"invalid object name {name!r} under {where}: expected a relative POSIX path "
            "without empty, '.' or '..' segments, '\\' or NUL"
        )
    return name


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

    detail = " ".join(str(exc).split()) or type(exc).__name__  # one line
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


class Storage:
    """One directory on an fsspec filesystem: a local folder (``endpoint`` None) or an S3
    prefix through s3fs (credentials from ``options`` or the AWS defaults). ``options``: the
    caller's storage_options, kept for ``probe`` and ``arrow_filesystem``."""

    def __init__(
        self, location: Location, fs: Any, endpoint: str | None, options: dict[str, Any]
    ) -> None:
        self.location = location
        self.fs = fs
        self.endpoint = endpoint
        self.options = options

    @property
    def uri(self) -> str:
        """The directory's canonical URI."""
        return self.location.uri

    @property
    def local(self) -> bool:
        """Whether the directory is on local disk."""
        return self.endpoint is None

    def sub(self, relative: str) -> Storage:
        """The storage of a sub-directory (relative POSIX path, '' = this one)."""
        return Storage(self.location.child(relative), self.fs, self.endpoint, self.options)

    def _path(self, name: str) -> str:
        return self.location.child(object_name(name, self.uri)).path

    def _missing(self, exc: BaseException) -> bool:
        """Whether ``exc`` only says that an object does not exist."""
        if self.local:
            return isinstance(exc, LOCAL_MISSING)
        return s3_error(exc, self.uri, self.endpoint or "") is None

    def _error(self, exc: BaseException, action: str) -> CheckpointError:
        """The typed error for a failure to ``action``."""
        if self.local:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            return StorageError(f"cannot {action} in {self.uri}: {detail}")
        return s3_error(exc, self.uri, self.endpoint or "") or StorageError(
            f"S3 object not found under {self.uri} at {self.endpoint}: {exc}"
        )

    @contextmanager
    def _errors(self, action: str, missing_ok: bool = False) -> Iterator[None]:
        """Typed errors for everything the filesystem raises; a plain missing object passes
        when ``missing_ok`` (the block is then cut short)."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as exc:  # s3fs, botocore and the OS raise many unrelated types
            if not (missing_ok and self._missing(exc)):
                raise self._error(exc, action) from None

    def get(self, name: str, limit: int | None = None) -> bytes | None:
        """The object ``name`` (at most ``limit`` bytes of it), None when it does not exist."""
        return self.get_many({name: limit})[name]

    def get_many(self, limits: Mapping[str, int | None]) -> dict[str, bytes | None]:
        """Read several objects at once (concurrently on S3), each at most ``limits[name]``
        bytes (None: whole); None for a missing one."""
        names = list(limits)
        paths = [self._path(n) for n in names]
        starts = [None if limits[n] is None else 0 for n in names]
        with self._errors("read"):
            results = self.fs.cat_ranges(
                paths, starts, [limits[n] for n in names], on_error="return"
            )
        out: dict[str, bytes | None] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, OSError) and "range is not satisfiable" in str(result):
                out[name] = b""  # S3 answers a ranged GET of an empty object with 416
            elif isinstance(result, BaseException):
                if not self._missing(result):
                    raise self._error(result, "read") from None
                out[name] = None
            else:
                out[name] = bytes(result)
        return out

    def put(self, name: str, data: bytes) -> None:
        """Atomically create or replace the object ``name`` (sub-folders made as needed):
        readers see the old or the new bytes."""
        path = self._path(name)
        with self._errors("write"):
            if not self.local:
                self.fs.pipe_file(path, data)
                return
            folder = os.path.dirname(path)
            temp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
            _write_durably(temp, data)
            os.replace(temp, path)
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def put_new(self, files: dict[str, bytes]) -> None:
        """Create objects that must not exist yet (never replacing one) and make them durable
        (locally each is fsynced; a later ``put`` in the folder fsyncs the folder)."""
        paths = {self._path(n): data for n, data in files.items()}
        with self._errors("write"):
            if not self.local:
                self.fs.pipe(paths)
                return
            for path, data in paths.items():
                _write_durably(path, data)

    def delete(self, *names: str) -> None:
        """Delete objects; missing ones are fine."""
        for path in [self._path(n) for n in names]:
            with self._errors("delete files", missing_ok=True):
                self.fs.rm_file(path)

    def list(self) -> dict[str, int]:
        """Every object under this directory (relative POSIX names, recursive, sorted) with
        its byte size; an object being ``put`` is not listed before it is complete."""
        return {name: size for name, (size, _) in self.list_times().items()}

    def list_times(self) -> dict[str, tuple[int, float]]:
        """As ``list``, each object with (byte size, last modification in POSIX seconds)."""
        root = self.location.path.replace(os.sep, "/")
        listing: dict[str, dict[str, Any]] = {}
        with self._errors("list files", missing_ok=True):
            listing = self.fs.find(root, detail=True)
        found = {}
        for key, info in listing.items():
            name = key[len(root) + 1 :]
            temp = TEMP_RE.match(name.rpartition("/")[2])
            if key.startswith(root + "/") and not name.endswith("/") and not temp:
                found[name] = (int(info.get("size") or 0), _modified(info))
        return dict(sorted(found.items()))

    def rename(self, name: str) -> Storage | None:
        """Move this directory to its sibling ``name``, which must not exist; returns the
        sibling, or None when there was nothing to move (someone else moved it). Locally one
        os.rename; on S3 each object is copied, then deleted (a mover that dies half way
        leaves objects in both places, none lost)."""
        target = self.location.sibling(name)
        moved = Storage(target, self.fs, self.endpoint, self.options)
        if self.local:
            with self._errors(f"rename to {target.uri}"):
                try:
                    os.rename(self.location.path, target.path)
                except FileNotFoundError:
                    return None
            return moved
        objects = self.list()
        if not objects:
            return None
        if moved.list():
            raise StorageError(f"cannot rename to {target.uri} in {self.uri}: it exists")
        for relative in objects:
            with self._errors(f"rename to {target.uri}", missing_ok=True):
                self.fs.cp_file(self._path(relative), moved._path(relative))
                self.delete(relative)
        return moved

    def probe(self) -> None:
        """Prove the storage is reachable, accepts the credentials and is writable, by writing
        and deleting a small uniquely named object. Raises StorageUnreachableError,
        StorageAuthError, BucketNotFoundError or StorageError naming the URI and endpoint."""
        name = f".granet-probe-{secrets.token_hex(6)}"
        if self.local:
            path = os.path.join(self.location.path, name)
            try:
                os.makedirs(self.location.path, exist_ok=True)
                _write_durably(path, PROBE_BYTES)
                os.remove(path)
            except OSError as exc:
                where = f" ({exc.filename})" if exc.filename not in (None, self.uri) else ""
                raise StorageError(
                    f"cannot write to {self.uri} (local disk): {exc.strerror or exc}{where}"
                ) from None
            return
        config = {**PROBE_CONFIG, **(self.options.get("config_kwargs") or {})}
        bounded = {**self.options, "config_kwargs": config, "skip_instance_cache": True}
        fs = _s3fs(self.location, bounded)
        fs.retries = 1  # s3fs's own retry loop on top of botocore's (attempts)
        storage = Storage(self.location, fs, self.endpoint, self.options)
        storage.get(name)  # a missing bucket answers NoSuchBucket (some servers create one on PUT)
        storage.put(name, PROBE_BYTES)
        storage.delete(name)

    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem | None, str]:
        """(filesystem, path) for Ray Train's ``RunConfig(storage_filesystem=...,
        storage_path=...)``, from the same storage options; None: Ray resolves the path."""
        if self.local or not self.options:
            return None, self.uri
        import pyarrow.fs

        options = dict(self.options)
        client = dict(options.pop("client_kwargs", None) or {})
        endpoint = options.pop("endpoint_url", None) or client.pop("endpoint_url", None)
        key, secret, token = (options.pop(k, None) for k in ("key", "secret", "token"))
        kwargs: dict[str, Any] = {}
        if key is not None:  # else the AWS default chain, as for s3fs
            kwargs.update(access_key=key, secret_key=secret, session_token=token)
        if options.pop("anon", False):
            kwargs["anonymous"] = True
        if "region_name" in client:
            kwargs["region"] = client.pop("region_name")
        if endpoint:
            parsed = urlsplit(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or parsed.path
            kwargs["scheme"] = parsed.scheme or "https"
        unknown = sorted(set(options) - S3FS_ONLY_OPTIONS)
        unknown += [f"client_kwargs.{k}" for k in sorted(client)]
        if unknown:
            raise InvalidURIError(
                f"storage_options {unknown} for {self.uri} have no pyarrow S3FileSystem "
                "equivalent (Ray's storage_filesystem)"
            )
        try:
            return pyarrow.fs.S3FileSystem(**kwargs), self.location.path
        except (TypeError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            raise InvalidURIError(f"invalid storage_options for {self.uri}: {exc}") from None

    def uri_of(self, path: str) -> str:
        """The store URI of a path on ``arrow_filesystem()`` as Ray reports it."""
        if self.local or "://" in path:
            return parse_uri(path).uri
        return parse_uri("s3://" + path.lstrip("/")).uri


def _modified(info: Mapping[str, Any]) -> float:
    """The modification time (POSIX seconds) in an fsspec listing entry: local ``mtime``, S3
    ``LastModified`` (0.0 when the entry has neither)."""
    stamp = info.get("mtime", info.get("LastModified"))
    if hasattr(stamp, "timestamp"):
        return float(stamp.timestamp())
    return float(stamp or 0.0)


def _write_durably(path: str, data: bytes) -> None:
    """Create the local file ``path`` (never replacing one, parent folders made) and fsync it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _s3fs(location: Location, options: dict[str, Any]) -> Any:
    """An ``s3fs.S3FileSystem`` for ``options``; InvalidURIError naming the URI if refused."""
    import s3fs

    try:
        return s3fs.S3FileSystem(**{"use_listings_cache": False, **options})
    except (TypeError, ValueError) as exc:
        raise InvalidURIError(f"invalid storage_options for {location.uri}: {exc}") from None


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
        import fsspec

        return Storage(location, fsspec.filesystem("file"), None, {})
    if storage_options is not None and not isinstance(storage_options, dict):
        raise InvalidURIError(f"storage_options must be a dict, got {type(storage_options)}")
    options = dict(storage_options or {})
    return Storage(location, _s3fs(location, options), _endpoint(options), options)


def make_bucket(bucket_or_uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Create an S3 bucket, given by name or as ``s3://bucket[/...]`` (no error if it exists)."""
    uri = bucket_or_uri if "://" in bucket_or_uri else f"s3://{bucket_or_uri}"
    storage = open_storage(uri, storage_options)
    if storage.local:
        raise InvalidURIError(f"make_bucket needs an S3 bucket, got {bucket_or_uri!r}")
    bucket = storage.location.path.split("/", 1)[0]
    with storage._errors("create the bucket"):
        if not storage.fs.exists(bucket):
            storage.fs.mkdir(bucket)
