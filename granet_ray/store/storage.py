"""The only storage code: URI parsing, and one directory on local disk or S3.

A ``Storage`` is one directory (local folder or S3 prefix) with two kinds of use. Checkpoints:
data files are written once under fresh names (``write``), ``commit`` replaces a file
atomically (local: temp file, fsync, os.replace, fsync of the directory; S3: a single PUT).
Plain objects (history, plots, sweep results): ``put`` / ``get`` / ``list`` / ``delete`` by
relative POSIX name. ``probe`` checks a storage before a run uses it, and ``arrow_filesystem``
gives Ray Train the same storage as a pyarrow filesystem. S3 goes through fsspec / s3fs; its
failures become typed errors that carry the URI and the endpoint.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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
# commit's temp files (".<name>.<12 hex>.tmp"): never listed as objects
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


def object_name(name: Any, where: str) -> str:
    """A plain object's name: a relative POSIX path ("a/b.json") that stays inside ``where``;
    InvalidURIError otherwise."""
    segments = name.split("/") if isinstance(name, str) else [""]
    if any(s in ("", ".", "..") for s in segments) or "\\" in name or "\x00" in name:
        raise InvalidURIError(
            f"invalid object name {name!r} under {where}: expected a relative POSIX path "
            "without empty, '.' or '..' segments, '\\' or NUL"
        )
    return name


class Storage(ABC):
    """One directory. Checkpoint primitives take plain file names (``scan`` and ``read`` also
    take "sub/dir/name"); the plain-object methods take relative POSIX names."""

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
    def remove(self, names: builtins.list[str]) -> None:
        """Delete files; missing ones are ignored."""

    @abstractmethod
    def scan(self, marker: str) -> dict[str, dict[str, int]]:
        """Sub-directories (relative POSIX paths, '' = this one) holding a file named
        ``marker``, each with the byte sizes of its files."""

    def put(self, name: str, data: bytes) -> None:
        """Atomically create or replace the object ``name`` (sub-folders made as needed)."""
        parent, _, base = object_name(name, self.uri).rpartition("/")
        self.sub(parent).commit(base, data)

    @abstractmethod
    def get(self, name: str) -> bytes | None:
        """The whole object ``name``, None when it does not exist."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete the object ``name``; a missing one is fine."""

    @abstractmethod
    def probe(self) -> None:
        """Prove the storage is reachable, accepts the credentials and is writable, by writing
        and deleting a small uniquely named object. Raises StorageUnreachableError,
        StorageAuthError, BucketNotFoundError or StorageError naming the URI and endpoint."""

    @abstractmethod
    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem | None, str]:
        """(filesystem, path) for Ray Train's ``RunConfig(storage_filesystem=...,
        storage_path=...)``, from the same storage options; None: Ray resolves the path."""

    @abstractmethod
    def uri_of(self, path: str) -> str:
        """The store URI of a path on ``arrow_filesystem()`` as Ray reports it."""

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """Names (relative POSIX paths, recursive, sorted) of the objects under this
        directory whose name starts with ``prefix``."""

    def _list_base(self, prefix: str) -> str:
        """The deepest directory (relative, '' = this one) holding every name of ``prefix``."""
        if not isinstance(prefix, str):
            raise InvalidURIError(f"invalid prefix {prefix!r} under {self.uri}: not a string")
        base = prefix.rpartition("/")[0]
        return object_name(base, self.uri) if base else ""


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

    def get(self, name: str) -> bytes | None:
        path = os.path.join(self.location.path, *object_name(name, self.uri).split("/"))
        with self._errors("read"):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None

    def delete(self, name: str) -> None:
        path = os.path.join(self.location.path, *object_name(name, self.uri).split("/"))
        with self._errors("delete files"), suppress(FileNotFoundError, NotADirectoryError):
            os.remove(path)

    def probe(self) -> None:
        path = os.path.join(self.location.path, f".granet-probe-{secrets.token_hex(6)}")
        try:
            os.makedirs(self.location.path, exist_ok=True)
            with open(path, "xb") as f:
                f.write(PROBE_BYTES)
                f.flush()
                os.fsync(f.fileno())
            os.remove(path)
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename not in (None, self.uri) else ""
            raise StorageError(
                f"cannot write to {self.uri} (local disk): {exc.strerror or exc}{where}"
            ) from None

    def arrow_filesystem(self) -> tuple[None, str]:
        return None, self.location.path

    def uri_of(self, path: str) -> str:
        return parse_uri(path).uri

    def list(self, prefix: str = "") -> builtins.list[str]:
        base = self._list_base(prefix)
        top = self.location.child(base).path
        names = []
        with self._errors("list files"):
            for dirpath, _, filenames in os.walk(top):
                relative = os.path.relpath(dirpath, self.location.path).replace(os.sep, "/")
                folder = "" if relative == "." else f"{relative}/"
                names += [folder + f for f in filenames if not TEMP_RE.match(f)]
        return sorted(n for n in names if n.startswith(prefix))


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


class S3Storage(Storage):
    """An S3 prefix, through s3fs (credentials from ``storage_options`` or the AWS defaults).
    ``options``: the caller's storage_options, kept for ``probe`` and ``arrow_filesystem``."""

    def __init__(self, location: Location, fs: Any, endpoint: str, options: dict[str, Any]) -> None:
        super().__init__(location)
        self.fs = fs
        self.endpoint = endpoint
        self.options = options

    def sub(self, relative: str) -> S3Storage:
        return S3Storage(self.location.child(relative), self.fs, self.endpoint, self.options)

    def _key(self, name: str) -> str:
        return f"{self.location.path}/{name}"

    def _raise(self, exc: BaseException) -> None:
        mapped = s3_error(exc, self.uri, self.endpoint)
        if mapped is not None:
            raise mapped from None

    @contextmanager
    def _errors(self, missing_ok: bool = False) -> Iterator[None]:
        """Typed errors for everything s3fs raises; a plain missing key passes when
        ``missing_ok`` (the block is then cut short)."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as exc:  # s3fs and botocore raise many unrelated types
            self._raise(exc)
            if not missing_ok:
                raise StorageError(
                    f"S3 object not found under {self.uri} at {self.endpoint}: {exc}"
                ) from None

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

    def get(self, name: str) -> bytes | None:
        key = self._key(object_name(name, self.uri))
        with self._errors(missing_ok=True):
            return bytes(self.fs.cat_file(key))
        return None

    def delete(self, name: str) -> None:
        key = self._key(object_name(name, self.uri))
        with self._errors(missing_ok=True):
            self.fs.rm_file(key)

    def probe(self) -> None:
        config = {**PROBE_CONFIG, **(self.options.get("config_kwargs") or {})}
        bounded = {**self.options, "config_kwargs": config, "skip_instance_cache": True}
        fs = _s3fs(self.location, bounded)
        fs.retries = 1  # s3fs's own retry loop on top of botocore's (attempts)
        storage = S3Storage(self.location, fs, self.endpoint, self.options)
        name = f".granet-probe-{secrets.token_hex(6)}"
        storage.get(name)  # a missing bucket answers NoSuchBucket (some servers create one on PUT)
        storage.commit(name, PROBE_BYTES)
        storage.delete(name)

    def arrow_filesystem(self) -> tuple[pyarrow.fs.FileSystem | None, str]:
        if not self.options:
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
        return parse_uri(path if "://" in path else "s3://" + path.lstrip("/")).uri

    def list(self, prefix: str = "") -> builtins.list[str]:
        base = self._list_base(prefix)
        root = self.location.path
        with self._errors(missing_ok=True):
            keys = self.fs.find(self.location.child(base).path)
            names = [k[len(root) + 1 :] for k in keys if k.startswith(root + "/")]
            return sorted(n for n in names if n.startswith(prefix) and not n.endswith("/"))
        return []


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
        return LocalStorage(location)
    if storage_options is not None and not isinstance(storage_options, dict):
        raise InvalidURIError(f"storage_options must be a dict, got {type(storage_options)}")
    options = dict(storage_options or {})
    return S3Storage(location, _s3fs(location, options), _endpoint(options), options)


def make_bucket(bucket_or_uri: str, storage_options: dict[str, Any] | None = None) -> None:
    """Create an S3 bucket, given by name or as ``s3://bucket[/...]`` (no error if it exists)."""
    uri = bucket_or_uri if "://" in bucket_or_uri else f"s3://{bucket_or_uri}"
    storage = open_storage(uri, storage_options)
    if not isinstance(storage, S3Storage):
        raise InvalidURIError(f"make_bucket needs an S3 bucket, got {bucket_or_uri!r}")
    bucket = storage.location.path.split("/", 1)[0]
    with storage._errors():
        if not storage.fs.exists(bucket):
            storage.fs.mkdir(bucket)
