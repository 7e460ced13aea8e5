"""Every bad input raises a typed CheckpointError whose message says what and where."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from fixtures_s3 import StorageRoot, masked_net, small_net
from torch import nn

import granet_ray.store as store
from granet_ray.store import (
    BucketNotFoundError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumMismatchError,
    InvalidInputError,
    InvalidURIError,
    ManifestError,
    MissingFileError,
    ModelMismatchError,
    SchemaMismatchError,
    StorageAuthError,
    StorageUnreachableError,
    TruncatedFileError,
    UnsupportedFormatError,
    load_sparse,
    save_sparse,
)
from granet_ray.testing.ports import free_port


def test_every_error_shares_one_base_class() -> None:
    errors = [getattr(store, n) for n in store.__all__ if n.endswith("Error")]
    assert len(errors) >= 15
    assert all(issubclass(e, CheckpointError) for e in errors)


# ---------------------------------------------------------------- tampering with a checkpoint


class Tamper:
    """A saved small checkpoint whose files a test can read, replace and delete."""

    def __init__(self, root: StorageRoot) -> None:
        import fsspec

        self.root = root
        self.model, self.masks = masked_net()
        self.uri = save_sparse(
            self.model, root.uri("ck"), masks=self.masks, storage_options=root.options
        )
        if root.kind == "local":
            self.fs, self.path = fsspec.filesystem("file"), self.uri
        else:
            self.fs = fsspec.filesystem("s3", **root.options, skip_instance_cache=True)
            self.path = self.uri.removeprefix("s3://")

    def manifest(self) -> dict:
        return json.loads(self.fs.cat_file(f"{self.path}/manifest.json"))

    def write_manifest(self, doc: dict) -> None:
        self.fs.pipe_file(f"{self.path}/manifest.json", json.dumps(doc).encode())

    def file(self, kind: str = "model-csr") -> str:
        return next(name for name in self.manifest()["files"] if name.startswith(kind))

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(f"{self.path}/{name}")

    def write(self, name: str, data: bytes, *, fix_manifest: bool = False) -> None:
        self.fs.pipe_file(f"{self.path}/{name}", data)
        if fix_manifest:  # make size and checksum agree so that the parser sees the bytes
            doc = self.manifest()
            doc["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            self.write_manifest(doc)

    def load(self, **kwargs) -> store.SparseCheckpoint:
        return load_sparse(self.uri, storage_options=self.root.options, **kwargs)


@pytest.fixture
def tamper(storage_root: StorageRoot) -> Tamper:
    return Tamper(storage_root)


def test_missing_manifest(storage_root: StorageRoot) -> None:
    with pytest.raises(CheckpointNotFoundError, match=r"no committed checkpoint at .*manifest"):
        load_sparse(storage_root.uri("nothing"), storage_options=storage_root.options)


def test_missing_file(tamper: Tamper) -> None:
    name = tamper.file()
    tamper.fs.rm_file(f"{tamper.path}/{name}")
    with pytest.raises(MissingFileError, match=rf"{name} is missing"):
        tamper.load()


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_file(tamper: Tamper, keep: float) -> None:
    name = tamper.file()
    data = tamper.read(name)
    size = int(len(data) * keep)
    tamper.write(name, data[:size])
    with pytest.raises(TruncatedFileError, match=rf"{name} is truncated: {size} bytes read"):
        tamper.load()


def test_checksum_mismatch(tamper: Tamper) -> None:
    name = tamper.file()
    data = bytearray(tamper.read(name))
    data[len(data) // 2] ^= 0xFF
    tamper.write(name, bytes(data))
    with pytest.raises(ChecksumMismatchError, match=rf"{name}: sha256 differs"):
        tamper.load()


def test_unknown_format_version(tamper: Tamper) -> None:
    doc = tamper.manifest()
    doc["format_version"] = 99
    tamper.write_manifest(doc)
    with pytest.raises(UnsupportedFormatError, match="format_version 99 is not supported"):
        tamper.load()


def test_dtype_outside_the_allowlist(tamper: Tamper) -> None:
    doc = tamper.manifest()
    doc["tensors"]["1.running_mean"]["dtype"] = "complex64"
    tamper.write_manifest(doc)
    with pytest.raises(UnsupportedFormatError, match=r"1\.running_mean.*'complex64'.*allowlist"):
        tamper.load()


def test_schema_mismatch_between_manifest_and_file(tamper: Tamper) -> None:
    doc = tamper.manifest()
    file = doc["tensors"]["0.weight"]["file"]
    for entry in doc["tensors"].values():
        if entry["file"] == file:  # the manifest says float64 throughout, the file has float32
            entry["dtype"], entry["data_types"]["values"] = "float64", "float64"
    tamper.write_manifest(doc)
    with pytest.raises(SchemaMismatchError, match=r"Arrow schema is .*values: list<item: float>"):
        tamper.load()
    doc["tensors"]["0.weight"]["dtype"] = "float32"
    doc["tensors"]["0.weight"]["data_types"]["values"] = "float32"
    tamper.write_manifest(doc)
    with pytest.raises(SchemaMismatchError, match=rf"{file}: its tensors imply different schemas"):
        tamper.load()


def test_value_count_mismatch(tamper: Tamper) -> None:
    doc = tamper.manifest()
    doc["tensors"]["0.weight"]["number_of_stored_values"] -= 1
    tamper.write_manifest(doc)
    with pytest.raises(SchemaMismatchError, match=r"'0\.weight' stores \d+ values, the manifest"):
        tamper.load()


def test_manifest_that_is_not_json(tamper: Tamper) -> None:
    tamper.fs.pipe_file(f"{tamper.path}/manifest.json", b"\x00\x01 not json")
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid UTF-8 JSON"):
        tamper.load()


@pytest.mark.parametrize(
    "name", ["../escape.000000000000.arrow", "/etc/passwd", "sub/x.000000000000.arrow", ".."]
)
def test_file_names_cannot_escape_the_checkpoint(tamper: Tamper, name: str) -> None:
    doc = tamper.manifest()
    old = tamper.file()
    doc["files"][name] = doc["files"].pop(old)
    for entry in doc["tensors"].values():
        if entry["file"] == old:
            entry["file"] = name
    tamper.write_manifest(doc)
    with pytest.raises(ManifestError, match=r"unsafe or invalid data file name"):
        tamper.load()


def test_shape_mismatch_against_the_model(tamper: Tamper) -> None:
    target = small_net()
    target[6] = nn.Linear(16, 12)
    before = target[0].weight.detach().clone()
    with pytest.raises(
        ModelMismatchError, match=r"'6\.weight': checkpoint \[10, 16\], model \[12, 16\]"
    ):
        tamper.load(model=target)
    assert torch.equal(target[0].weight, before), "nothing is written on a mismatch"


def test_missing_and_unexpected_keys_against_the_model(tamper: Tamper) -> None:
    target = nn.Sequential(small_net(), nn.Linear(10, 2))
    with pytest.raises(ModelMismatchError, match=r"missing keys \['0\.0\.weight'.*unexpected keys"):
        tamper.load(model=target)


def test_bad_load_arguments(tamper: Tamper) -> None:
    with pytest.raises(InvalidInputError, match="layout must be one of"):
        tamper.load(layout="coo")
    with pytest.raises(InvalidInputError, match="cannot be combined with model"):
        tamper.load(layout="csr", model=small_net())
    with pytest.raises(InvalidInputError, match="invalid map_location"):
        tamper.load(map_location="nowhere")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="invalid map_location 'cuda'"):
            tamper.load(map_location="cuda")


# ---------------------------------------------------------------- no pickle on the load path


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_payload_is_never_executed(tamper: Tamper, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    torch_payload = tmp_path / "payload.pt"
    torch.save({"x": _Payload(marker)}, torch_payload)
    name = tamper.file()
    tamper.write(name, payload, fix_manifest=True)
    with pytest.raises(SchemaMismatchError, match="not a readable Arrow IPC file"):
        tamper.load()
    tamper.write(name, torch_payload.read_bytes(), fix_manifest=True)
    with pytest.raises(SchemaMismatchError, match="not a readable Arrow IPC file"):
        tamper.load()
    tamper.fs.pipe_file(f"{tamper.path}/manifest.json", payload)
    with pytest.raises(ManifestError):
        tamper.load()
    assert not marker.exists()


def test_load_never_calls_pickle(tamper: Tamper, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used on the load path")

    for module, name in [
        (pickle, "load"),
        (pickle, "loads"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
    loaded = tamper.load(model=small_net())
    assert set(loaded.masks) == set(tamper.masks)


# ---------------------------------------------------------------- bad input to save


def _save(state, masks, tmp_path: Path, **kwargs) -> str:
    return save_sparse(state, tmp_path / "ck", masks=masks, **kwargs)


def test_bad_masks_are_refused(tmp_path: Path) -> None:
    model, masks = masked_net()
    weight = model.state_dict()["0.weight"]
    with pytest.raises(InvalidInputError, match=r"mask for '0\.weight' must be a torch\.bool"):
        _save(model, {"0.weight": masks["0.weight"].float()}, tmp_path)
    with pytest.raises(InvalidInputError, match=r"mask for '0\.weight' has shape \(8, 27\)"):
        _save(model, {"0.weight": masks["0.weight"].reshape(8, 27)}, tmp_path)
    with pytest.raises(InvalidInputError, match=r"'0\.bias' of shape \(8,\): only >= 2-D"):
        _save(model, {"0.bias": torch.ones(8, dtype=torch.bool)}, tmp_path)
    with pytest.raises(InvalidInputError, match=r"mask given for 'nope', which is not in"):
        _save(model, {"nope": masks["0.weight"]}, tmp_path)
    with pytest.raises(InvalidInputError, match=r"'1\.num_batches_tracked' of dtype torch\.int64"):
        _save(model, {"1.num_batches_tracked": torch.ones((), dtype=torch.bool)}, tmp_path)
    dense = {**model.state_dict(), "0.weight": weight + (weight == 0) * 1e-3}
    with pytest.raises(InvalidInputError, match=r"'0\.weight' has \d+ non-zero value\(s\) outside"):
        _save(dense, masks, tmp_path)
    assert not (tmp_path / "ck").exists(), "nothing is written for bad input"


def test_bad_state_metadata_and_optimizer_state(tmp_path: Path) -> None:
    model, masks = masked_net()
    with pytest.raises(InvalidInputError, match="state must be an nn.Module or a state dict"):
        _save([1, 2], {}, tmp_path)
    with pytest.raises(InvalidInputError, match=r"state\['z'\] has dtype torch\.complex64"):
        _save({"z": torch.zeros(2, dtype=torch.complex64)}, {}, tmp_path)
    with pytest.raises(InvalidInputError, match=r"state\['x'\] is a str"):
        _save({"x": "text"}, {}, tmp_path)
    with pytest.raises(InvalidInputError, match=r"metadata\['loss'\] is nan"):
        _save(model, masks, tmp_path, metadata={"loss": float("nan")})
    with pytest.raises(
        InvalidInputError, match=r"metadata\['cfg'\]\['f'\] is a builtin_function_or_method"
    ):
        _save(model, masks, tmp_path, metadata={"cfg": {"f": len}})
    with pytest.raises(InvalidInputError, match="optimizer_state must be a dict with keys"):
        _save(model, masks, tmp_path, optimizer_state={"state": {}})
    bad = {"state": {"0.weight": {"momentum_buffer": torch.ones(8, 3, 3, 3)}}, "param_groups": []}
    with pytest.raises(InvalidInputError, match=r"\['momentum_buffer'\] has \d+ non-zero"):
        _save(model, masks, tmp_path, optimizer_state=bad)
    assert not (tmp_path / "ck").exists()


def test_a_failed_save_overwrites_nothing(storage_root: StorageRoot) -> None:
    model, masks = masked_net()
    uri = save_sparse(
        model, storage_root.uri("ck"), masks=masks, storage_options=storage_root.options
    )
    before = load_sparse(uri, storage_options=storage_root.options).manifest
    with pytest.raises(CheckpointExistsError, match="pass overwrite=True"):
        save_sparse(model, uri, masks=masks, storage_options=storage_root.options)
    with pytest.raises(InvalidInputError):
        bad = {"0.weight": masks["0.weight"].float()}
        save_sparse(model, uri, masks=bad, overwrite=True, storage_options=storage_root.options)
    after = load_sparse(uri, storage_options=storage_root.options).manifest
    assert after == before


# ---------------------------------------------------------------- URIs and storage


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "expected a non-empty string"),
        ("gs://bucket/ck", "scheme 'gs'"),
        ("http://example.com/ck", "scheme 'http'"),
        ("s3://ab/ck", "bucket 'ab' must be 3-63"),
        ("s3://bucket/a/../b", r"'\.', '\.\.' or"),
        ("file://otherhost/ck", "file:// URIs must be local"),
        ("s3://bucket/ck?versionId=1", "no query or fragment"),
    ],
)
def test_bad_uris(uri: str, message: str) -> None:
    with pytest.raises(InvalidURIError, match=message):
        load_sparse(uri)


def test_storage_options_for_a_local_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidURIError, match="storage_options apply to s3:// URIs only"):
        load_sparse(tmp_path, storage_options={"key": "k"})


def test_unreachable_endpoint() -> None:
    port = free_port()  # nothing listens on it
    options = {
        "key": "k",
        "secret": "s",
        "endpoint_url": f"http://127.0.0.1:{port}",
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    with pytest.raises(
        StorageUnreachableError, match=rf"cannot reach S3 endpoint .*:{port} for s3://"
    ):
        load_sparse("s3://bucket/ck", storage_options=options)


def test_wrong_credentials(seaweedfs, s3_prefix: str) -> None:
    model, masks = masked_net()
    uri = save_sparse(model, s3_prefix, masks=masks, storage_options=seaweedfs.storage_options)
    wrong = {**seaweedfs.storage_options, "secret": "wrong-secret"}
    with pytest.raises(StorageAuthError, match=rf"refused access to {uri} \(SignatureDoesNotMatch"):
        load_sparse(uri, storage_options=wrong)
    unknown = {**seaweedfs.storage_options, "key": "nobody"}
    with pytest.raises(StorageAuthError, match="check the credentials"):
        save_sparse(model, f"{s3_prefix}/other", masks=masks, storage_options=unknown)


def test_missing_bucket(seaweedfs) -> None:
    with pytest.raises(BucketNotFoundError, match=r"bucket 'no-such-bucket' does not exist"):
        load_sparse("s3://no-such-bucket/ck", storage_options=seaweedfs.storage_options)
    with pytest.raises(InvalidURIError, match="invalid storage_options"):
        load_sparse("s3://bucket/ck", storage_options={**seaweedfs.storage_options, "bogus": 1})


def test_local_path_that_is_a_file(tmp_path: Path) -> None:
    model, masks = masked_net()
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"cannot .* in .*file"):
        save_sparse(model, tmp_path / "file", masks=masks)
    assert os.path.getsize(tmp_path / "file") == 1


def test_corrupt_pattern_writes_nothing_into_the_model(tmp_path: Path) -> None:
    """A malformed CSR pattern (with a valid checksum) is caught before the model changes."""
    model, masks = masked_net()
    uri = Path(save_sparse(model, tmp_path / "ck", masks=masks))
    doc = json.loads((uri / "manifest.json").read_text())
    entry = doc["tensors"]["6.weight"]
    path = uri / entry["file"]
    table = pa.ipc.open_file(pa.py_buffer(path.read_bytes())).read_all()
    row = table.to_batches()[entry["batch"]]
    indices = row.column("indices")[0].values.to_numpy().copy()
    indices[[0, 1]] = indices[[1, 0]]  # no longer strictly increasing in its row
    columns = [row.column(0), row.column(1), pa.array([indices], row.schema.field(2).type)]
    batches = [
        b if i != entry["batch"] else pa.record_batch([*columns, row.column(3)], schema=row.schema)
        for i, b in enumerate(table.to_batches())
    ]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    data = sink.getvalue().to_pybytes()
    path.write_bytes(data)
    doc["files"][entry["file"]] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (uri / "manifest.json").write_text(json.dumps(doc))
    target = small_net()
    before = {name: t.clone() for name, t in target.state_dict().items()}
    with pytest.raises(SchemaMismatchError, match=r"'6\.weight'.*not strictly increasing"):
        load_sparse(uri, model=target)
    for name, tensor in target.state_dict().items():
        assert torch.equal(tensor, before[name]), name
