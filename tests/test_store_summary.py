"""``summarize`` (``ckpt inspect``): verifies every data file by default, the manifest only
with ``verify=False``."""

from __future__ import annotations

import pytest
from fixtures_s3 import StorageRoot, masked_net

from granet_ray.store import (
    ChecksumMismatchError,
    MissingFileError,
    Storage,
    TruncatedFileError,
    open_storage,
    save_sparse,
)
from granet_ray.store.summary import summarize


@pytest.fixture
def saved(storage_root: StorageRoot) -> tuple[str, Storage, str]:
    """(checkpoint URI, its storage, the name of its CSR data file)."""
    model, masks = masked_net()
    uri = save_sparse(
        model, storage_root.uri("ck"), masks=masks, storage_options=storage_root.options
    )
    storage = open_storage(uri, storage_root.options)
    name = next(n for n in storage.list() if n.startswith("model-csr"))
    return uri, storage, name


def _flip_a_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        ("flip", ChecksumMismatchError, "sha256 differs from manifest.json"),
        ("truncate", TruncatedFileError, "is truncated: "),
        ("delete", MissingFileError, "is missing"),
    ],
)
def test_verify_catches_a_damaged_data_file(
    saved, storage_root: StorageRoot, damage: str, error: type, message: str
) -> None:
    uri, storage, name = saved
    before = summarize(uri, storage_root.options)
    data = storage.get(name)
    assert data is not None
    if damage == "flip":
        storage.put(name, _flip_a_byte(data))
    elif damage == "truncate":
        storage.put(name, data[: len(data) // 2])
    else:
        storage.delete(name)
    with pytest.raises(error, match=rf"{uri}/{name}.*{message}"):
        summarize(uri, storage_options=storage_root.options)
    assert summarize(uri, storage_root.options, verify=False) == before


def test_without_verify_only_the_manifest_is_read(
    saved, storage_root: StorageRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, storage, _ = saved
    files = storage.list()
    names: list[str] = []
    original = Storage.get_many

    def spy(self: Storage, wanted: dict[str, int | None]) -> dict[str, bytes | None]:
        names.extend(wanted)
        return original(self, wanted)

    monkeypatch.setattr(Storage, "get_many", spy)
    summary = summarize(uri, storage_root.options, verify=False)
    assert names == ["manifest.json"]
    assert summary.file_count == len(files)
    names.clear()
    summarize(uri, storage_root.options)
    assert sorted(names) == list(files)
