"""Round trips of the sparse checkpoint store, on a local folder and on SeaweedFS (S3)."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
import torchvision
from fixtures_s3 import StorageRoot, masked_net, small_net
from torch import nn

from granet_ray.sparsity import erk_densities, initial_masks, prunable_parameters
from granet_ray.store import (
    CheckpointExistsError,
    latest_checkpoint,
    list_checkpoints,
    load_sparse,
    optimizer_state_by_name,
    optimizer_state_from_names,
    save_sparse,
)

INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's raw bits as same-width integers: comparisons are bit-exact (NaN, -0.0)."""
    flat = tensor.detach().reshape(-1).contiguous()
    return flat.view(INT_OF_SIZE[flat.element_size()]).numpy()


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Bit-exact equality; with a mask: bit-exact inside it, and ``a`` is +0.0 outside it
    where ``b`` is zero (GraNet's ``w *= mask`` leaves -0.0 there, which is not stored)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if mask is None:
        assert np.array_equal(bits(a), bits(b))
        return
    inside = mask.reshape(-1).numpy()
    assert np.array_equal(np.where(inside, bits(a), 0), np.where(inside, bits(b), 0))
    assert not np.where(inside, 0, bits(a)).any()
    assert not np.where(inside, 0, b.detach().reshape(-1).float().numpy()).any()


def assert_state_equal(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], masks: dict
) -> None:
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert_bit_equal(got[name], tensor, masks.get(name))


def test_round_trip_dense_is_bit_exact(storage_root: StorageRoot) -> None:
    model, masks = masked_net()
    uri = save_sparse(
        model,
        storage_root.uri("ck"),
        masks=masks,
        metadata={"step": 7, "config": {"final_density": 0.1}},
        storage_options=storage_root.options,
    )
    assert uri == storage_root.uri("ck")
    loaded = load_sparse(uri, storage_options=storage_root.options)
    expected = model.state_dict()
    assert_state_equal(loaded.state_dict, expected, masks)
    assert set(loaded.masks) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(loaded.masks[name], mask)
        # an active weight equal to 0.0 stays active: the pattern comes from the mask
        zeros_inside = mask & (expected[name] == 0)
        assert zeros_inside.any() and loaded.masks[name][zeros_inside].all()
    assert loaded.metadata == {"step": 7, "config": {"final_density": 0.1}}
    assert loaded.optimizer_state is None
    manifest = loaded.manifest
    assert manifest.tensors["0.weight"].format == "CSR"
    assert manifest.tensors["0.weight"].shape == (8, 27)
    assert manifest.tensors["0.weight"].tensor_shape == (8, 3, 3, 3)
    assert manifest.tensors["0.bias"].format == "DENSE"


def test_round_trip_csr_layout(storage_root: StorageRoot) -> None:
    model, masks = masked_net(seed=1)
    uri = save_sparse(model, storage_root.uri("ck"), masks=masks, **_opts(storage_root))
    loaded = load_sparse(uri, layout="csr", storage_options=storage_root.options)
    for name, tensor in model.state_dict().items():
        got = loaded.state_dict[name]
        if name not in masks:
            assert_bit_equal(got, tensor)
            continue
        assert got.layout == torch.sparse_csr
        assert got.shape == (tensor.shape[0], math.prod(tensor.shape[1:]))
        assert got.crow_indices().dtype == torch.int64
        assert_bit_equal(got.to_dense().view(tensor.shape), tensor, masks[name])
        assert got.values().numel() == int(masks[name].sum())
        assert torch.equal(loaded.masks[name], masks[name])


def test_load_into_model_is_strict_and_in_place(storage_root: StorageRoot) -> None:
    model, masks = masked_net(seed=2)
    uri = save_sparse(model, storage_root.uri("ck"), masks=masks, **_opts(storage_root))
    target = small_net()
    weight = target[0].weight
    loaded = load_sparse(uri, model=target, storage_options=storage_root.options)
    assert target[0].weight is weight, "parameters are written in place, not replaced"
    assert_state_equal(target.state_dict(), model.state_dict(), masks)
    for name, tensor in target.state_dict().items():
        assert loaded.state_dict[name].data_ptr() == tensor.data_ptr()
    model.eval()
    target.eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), target(x))


def test_load_into_model_of_other_dtype_casts(tmp_path) -> None:
    model, masks = masked_net(seed=3)
    uri = save_sparse(model, tmp_path / "ck", masks=masks)
    target = small_net().double()
    load_sparse(uri, model=target)
    for name, tensor in model.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor.to(target.state_dict()[name].dtype))


def test_every_dtype_and_edge_pattern_round_trips(storage_root: StorageRoot) -> None:
    torch.manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        mask = torch.rand(6, 4, 3) < 0.4
        weight = torch.randn(6, 4, 3).to(dtype) * mask
        weight[tuple(mask.nonzero()[0].tolist())] = -0.0 if dtype != torch.float64 else float("nan")
        state[f"w_{dtype}".replace("torch.", "")] = weight
        masks[f"w_{dtype}".replace("torch.", "")] = mask
    state["empty_mask"] = torch.zeros(3, 5)
    masks["empty_mask"] = torch.zeros(3, 5, dtype=torch.bool)
    state["full_mask"] = torch.randn(300, 2)  # > 255 rows: uint16 indptr
    masks["full_mask"] = torch.ones(300, 2, dtype=torch.bool)
    state["wide"] = torch.zeros(2, 70000)  # > 65536 columns: uint32 indices
    masks["wide"] = torch.zeros(2, 70000, dtype=torch.bool)
    masks["wide"][1, 69999] = True
    state["wide"][1, 69999] = 2.5
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        state[f"buf_{dtype}".replace("torch.", "")] = torch.randint(-5, 100, (7,)).to(dtype)
    state["flags"] = torch.tensor([True, False, True])
    state["scalar"] = torch.tensor(3.25)
    state["nothing"] = torch.zeros(0, 4)
    uri = save_sparse(state, storage_root.uri("ck"), masks=masks, **_opts(storage_root))
    for layout in ("dense", "csr"):
        loaded = load_sparse(uri, layout=layout, storage_options=storage_root.options)
        for name, tensor in state.items():
            got = loaded.state_dict[name]
            if layout == "csr" and name in masks:
                # values in row-major mask order (to_dense() would turn -0.0 into 0.0)
                assert_bit_equal(got.values(), tensor[masks[name]])
                got = got.to_dense().view(tensor.shape)
            if name in masks:  # -0.0 and NaN inside the mask keep their bits
                assert torch.equal(got != 0, tensor != 0)
                if layout == "dense":
                    assert_bit_equal(got, tensor, masks[name])
            else:
                assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        for name, mask in masks.items():
            assert torch.equal(loaded.masks[name], mask), name
    types = loaded.manifest.tensors
    assert types["wide"].data_types["indices_1"] == "uint32"
    assert types["full_mask"].data_types["indices_1"] == "uint8"
    assert types["w_bfloat16"].data_types["values"] == "uint16"
    assert types["flags"].data_types["values"] == "bint8"


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, masks) -> None:
    optimizer.zero_grad()
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    params = dict(model.named_parameters())
    with torch.no_grad():  # GraNet keeps weights and weight-shaped state masked
        for name, mask in masks.items():
            params[name].mul_(mask)
            for value in optimizer.state[params[name]].values():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    value.mul_(mask)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_state_round_trip(storage_root: StorageRoot, kind: str) -> None:
    model, masks = masked_net(seed=4)

    def make(m: nn.Module) -> torch.optim.Optimizer:
        if kind == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        return torch.optim.Adam(
            [{"params": list(m.parameters())[:2], "lr": 1e-3}, {"params": list(m.parameters())[2:]}]
        )

    optimizer = make(model)
    _train_step(model, optimizer, masks)
    _train_step(model, optimizer, masks)
    by_name = optimizer_state_by_name(optimizer, model.named_parameters())
    uri = save_sparse(
        model,
        storage_root.uri("ck"),
        masks=masks,
        optimizer_state=by_name,
        storage_options=storage_root.options,
    )
    loaded = load_sparse(uri, storage_options=storage_root.options)
    entries = loaded.manifest.optimizer_state
    key = "momentum_buffer" if kind == "sgd" else "exp_avg"
    assert entries["3.weight"][key].format == "CSR"
    assert entries["3.weight"][key].pattern == "3.weight"
    assert entries["1.weight"][key].format == "DENSE"

    clone = small_net()
    load_sparse(uri, model=clone, storage_options=storage_root.options)
    restored = make(clone)
    restored.load_state_dict(
        optimizer_state_from_names(loaded.optimizer_state, restored, clone.named_parameters())
    )
    assert restored.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    pairs = zip(model.named_parameters(), clone.parameters(), strict=True)
    for (name, p_old), p_new in pairs:
        old, new = optimizer.state[p_old], restored.state[p_new]
        assert old.keys() == new.keys()
        for k in old:
            mask = masks.get(name) if old[k].shape == p_old.shape else None
            assert_bit_equal(new[k], old[k], mask)
    # training continues identically from the restored state
    torch.manual_seed(9)
    _train_step(model, optimizer, masks)
    torch.manual_seed(9)
    _train_step(clone, restored, masks)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)
    csr = load_sparse(uri, layout="csr", storage_options=storage_root.options)
    state = csr.optimizer_state["state"]["3.weight"][key]
    assert state.layout == torch.sparse_csr
    assert torch.equal(state.crow_indices(), csr.state_dict["3.weight"].crow_indices())


def test_resnet18_with_engine_masks_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    params = prunable_parameters(model)
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    masks = initial_masks(shapes, erk_densities(shapes, 0.1), seed=0)
    with torch.no_grad():
        for name, p in params.items():
            p.mul_(masks[name])
    uri = save_sparse(model, tmp_path / "r18", masks=masks)
    clone = torchvision.models.resnet18(weights=None)
    loaded = load_sparse(uri, model=clone)
    assert_state_equal(clone.state_dict(), model.state_dict(), masks)
    for name, mask in masks.items():
        assert torch.equal(loaded.masks[name], mask)
    dense = io.BytesIO()
    torch.save(model.state_dict(), dense)
    stored = sum(f.bytes for f in loaded.manifest.files.values())
    assert stored < 0.2 * len(dense.getvalue())


def test_overwrite_needs_the_flag_and_replaces_files(storage_root: StorageRoot) -> None:
    model, masks = masked_net(seed=5)
    uri = save_sparse(model, storage_root.uri("ck"), masks=masks, **_opts(storage_root))
    first = load_sparse(uri, storage_options=storage_root.options).manifest
    with pytest.raises(CheckpointExistsError, match="already holds a checkpoint"):
        save_sparse(model, uri, masks=masks, **_opts(storage_root))
    other, other_masks = masked_net(seed=6)
    save_sparse(other, uri, masks=other_masks, overwrite=True, **_opts(storage_root))
    loaded = load_sparse(uri, storage_options=storage_root.options)
    assert loaded.manifest.save_id != first.save_id
    assert_state_equal(loaded.state_dict, other.state_dict(), other_masks)
    # the replaced checkpoint's data files are gone: only one checkpoint's files remain
    assert list_checkpoints(storage_root.base, storage_root.options) == [uri]
    files = _files(storage_root, "ck")
    assert files == {"manifest.json", *loaded.manifest.files}


def test_list_and_latest_checkpoints(storage_root: StorageRoot) -> None:
    model, masks = masked_net(seed=7)
    opts = _opts(storage_root)
    assert list_checkpoints(storage_root.base, storage_root.options) == []
    assert latest_checkpoint(storage_root.base, storage_root.options) is None
    for step in (30, 10, 20):
        save_sparse(
            model, storage_root.uri("run", f"s{step}"), masks=masks, metadata={"step": step}, **opts
        )
    # a folder without manifest and one with a broken manifest are not checkpoints
    save_sparse(
        model, storage_root.uri("run", "broken"), masks=masks, metadata={"step": 99}, **opts
    )
    _put(storage_root, "run/broken/manifest.json", b"{not json")
    _put(storage_root, "run/stray/model-dense-float32.0123456789ab.arrow", b"data")
    found = list_checkpoints(storage_root.uri("run"), storage_root.options)
    assert found == [storage_root.uri("run", f"s{s}") for s in (10, 20, 30)]
    assert latest_checkpoint(storage_root.uri("run"), storage_root.options) == found[-1]
    # without a step on every checkpoint the creation time orders them
    save_sparse(model, storage_root.uri("run", "later"), masks=masks, **opts)
    found = list_checkpoints(storage_root.uri("run"), storage_root.options)
    assert found[-1] == storage_root.uri("run", "later")
    assert found[:3] == [storage_root.uri("run", f"s{s}") for s in (30, 10, 20)]


def test_plain_pyarrow_reads_a_checkpoint(storage_root: StorageRoot, request) -> None:
    """Any Arrow tool can open a checkpoint: only json, numpy and pyarrow below."""
    model, masks = masked_net(seed=8)
    uri = save_sparse(model, storage_root.uri("ck"), masks=masks, **_opts(storage_root))
    if storage_root.kind == "s3":
        fs = request.getfixturevalue("seaweedfs").pyarrow_filesystem()
        root = uri.removeprefix("s3://")
    else:
        fs, root = pafs.LocalFileSystem(), uri
    with fs.open_input_stream(f"{root}/manifest.json") as f:
        manifest = json.loads(f.read())
    numpy_types = {"float32": np.float32, "int64": np.int64}
    for name, tensor in model.state_dict().items():
        entry = manifest["tensors"][name]
        with fs.open_input_file(f"{root}/{entry['file']}") as f:
            table = pa.ipc.open_file(f).get_batch(entry["batch"])
        row = entry["row"]
        assert table.column("name")[row].as_py() == name
        if entry["format"] == "CSR":
            indptr, indices, values = (
                table.column(c)[row].values.to_numpy() for c in ("indptr", "indices", "values")
            )
            rows, cols = entry["shape"]
            dense = np.zeros((rows, cols), numpy_types[entry["dtype"]])
            for r in range(rows):
                span = slice(indptr[r], indptr[r + 1])
                dense[r, indices[span]] = values[span]
        else:
            dense = table.column("values")[row].values.to_numpy()
        expected = tensor.numpy().reshape(entry["tensor_shape"])
        assert np.array_equal(dense.reshape(entry["tensor_shape"]), expected)


def test_ray_style_copied_directory_loads_from_anywhere(tmp_path, seaweedfs, s3_prefix) -> None:
    """Ray Train uploads the local checkpoint folder as is: relative names keep it valid."""
    model, masks = masked_net(seed=9)
    local = save_sparse(model, tmp_path / "staging", masks=masks, metadata={"step": 1})
    fs = seaweedfs.pyarrow_filesystem()
    pafs.copy_files(
        local, f"{s3_prefix.removeprefix('s3://')}/checkpoint_000001", destination_filesystem=fs
    )
    uri = f"{s3_prefix}/checkpoint_000001"
    loaded = load_sparse(uri, storage_options=seaweedfs.storage_options)
    assert_state_equal(loaded.state_dict, model.state_dict(), masks)
    assert latest_checkpoint(s3_prefix, seaweedfs.storage_options) == uri
    file_uri = load_sparse(f"file://{local}").uri
    assert file_uri == str(local)


def _opts(root: StorageRoot) -> dict:
    return {"storage_options": root.options}


def _files(root: StorageRoot, *parts: str) -> set[str]:
    import fsspec

    if root.kind == "local":
        fs, path = fsspec.filesystem("file"), root.uri(*parts)
    else:
        fs, path = fsspec.filesystem("s3", **root.options), root.uri(*parts).removeprefix("s3://")
    return {p.rsplit("/", 1)[-1] for p in fs.find(path)}


def _put(root: StorageRoot, relative: str, data: bytes) -> None:
    import fsspec

    if root.kind == "local":
        fs, path = fsspec.filesystem("file", auto_mkdir=True), root.uri(relative)
    else:
        fs, path = fsspec.filesystem("s3", **root.options), root.uri(relative).removeprefix("s3://")
    fs.pipe_file(path, data)
