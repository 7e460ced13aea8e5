"""A damaged checkpoint never blocks a run: saving into its name sets it aside (renamed, never
deleted, with a warning) instead of refusing; a committed, verified checkpoint is still never
overwritten. Also: loading into a meta model and exporting onto a folder fail clearly."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from fixtures_s3 import StorageRoot, masked_net, small_net

from granet_ray.store import (
    CheckpointExistsError,
    InvalidInputError,
    InvalidURIError,
    latest_checkpoint,
    list_checkpoints,
    load_sparse,
    open_storage,
    save_sparse,
)
from granet_ray.store.export import export_safetensors

NAMES = [f"checkpoint_epoch_0001_step_000{step}" for step in (1, 2, 3)]


def _damage(storage_root: StorageRoot, name: str, how: str) -> dict[str, bytes]:
    """Damage the checkpoint ``name`` of the run folder ``how``; returns its files as they
    are after the damage."""
    storage = open_storage(storage_root.uri("run", name), storage_root.options)
    data_file = next(n for n in storage.list() if n.startswith("model-csr"))
    data = storage.get(data_file)
    assert data is not None
    if how == "truncate":
        storage.put(data_file, data[: len(data) // 2])
    elif how == "flip":  # same size: only the checksum tells
        middle = len(data) // 2
        storage.put(data_file, data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :])
    elif how == "delete":
        storage.delete(data_file)
    else:
        storage.put("manifest.json", b"{not json")
    return {n: storage.get(n) or b"" for n in storage.list()}


@pytest.mark.parametrize("how", ["truncate", "flip", "delete", "manifest"])
def test_a_damaged_checkpoint_is_set_aside_and_the_run_goes_on(
    storage_root: StorageRoot, how: str
) -> None:
    """The run lost its newest checkpoint and the next newest is damaged: it resumes from
    the one before and can write the damaged one's name again."""
    model, masks = masked_net(seed=0)
    options = storage_root.options
    uris = [
        save_sparse(
            model,
            storage_root.uri("run", name),
            masks=masks,
            metadata={"step": step},
            storage_options=options,
        )
        for step, name in enumerate(NAMES, start=1)
    ]
    damaged = _damage(storage_root, NAMES[2], how)
    if how != "flip":  # a same-size change is only found by the checksums of a load
        assert latest_checkpoint(storage_root.uri("run"), options) == uris[1]
    other, other_masks = masked_net(seed=1)
    with pytest.warns(UserWarning) as caught:
        again = save_sparse(
            other, uris[2], masks=other_masks, metadata={"step": 3}, storage_options=options
        )
    assert again == uris[2]
    [warning] = caught
    message = str(warning.message)
    aside = re.search(rf"set aside as ({re.escape(uris[2])}\.damaged-\d{{8}}T\d{{6}}Z)$", message)
    assert aside, message
    assert message.startswith(f"{uris[2]} held a damaged checkpoint (")
    # nothing was deleted: the damaged checkpoint is there, file for file, under its new name
    moved = open_storage(aside.group(1), options)
    assert {n: moved.get(n) for n in moved.list()} == damaged
    loaded = load_sparse(uris[2], storage_options=options)
    assert all(loaded.state_dict[n].equal(t) for n, t in other.state_dict().items())
    # the set-aside folder is not a checkpoint of the run, and the run goes on
    assert list_checkpoints(storage_root.uri("run"), options) == uris
    assert latest_checkpoint(storage_root.uri("run"), options) == uris[2]
    # a committed, verified checkpoint is never replaced without overwrite=True
    with pytest.raises(CheckpointExistsError, match="already holds a checkpoint"):
        save_sparse(model, uris[2], masks=masks, storage_options=options)
    assert load_sparse(uris[2], storage_options=options).manifest == loaded.manifest


def test_an_uncommitted_checkpoint_is_no_obstacle(storage_root: StorageRoot) -> None:
    """Data files without a manifest (a save killed half way) are no checkpoint: saving into
    their folder neither refuses nor warns."""
    model, masks = masked_net()
    stray = open_storage(storage_root.uri("ck"), storage_root.options)
    stray.put("model-dense-float32.0123456789ab.arrow", b"half")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uri = save_sparse(model, stray.uri, masks=masks, storage_options=storage_root.options)
    assert load_sparse(uri, storage_options=storage_root.options).masks.keys() == masks.keys()


def test_load_into_a_meta_model_fails_clearly(tmp_path: Path) -> None:
    model, masks = masked_net()
    uri = save_sparse(model, tmp_path / "ck", masks=masks)
    with torch.device("meta"):
        target = small_net()
    with pytest.raises(
        InvalidInputError,
        match=rf"cannot load {re.escape(uri)} into a model on the meta device "
        r"\('0\.weight' has no storage\): materialize the model first",
    ):
        load_sparse(uri, model=target)
    with pytest.raises(InvalidInputError, match="invalid map_location 'meta': meta tensors"):
        load_sparse(uri, map_location="meta")
    # materialized, the same model loads
    target.to_empty(device="cpu")
    load_sparse(uri, model=target)
    assert all(target.state_dict()[n].equal(t) for n, t in model.state_dict().items())


def test_export_onto_a_folder_names_the_folder(tmp_path: Path) -> None:
    model, masks = masked_net()
    uri = save_sparse(model, tmp_path / "ck", masks=masks)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(
        InvalidURIError,
        match=rf"invalid output {folder}: it is a folder; give the file to write, e\.g\. "
        rf"{folder}/ck\.safetensors",
    ):
        export_safetensors(uri, folder)
    assert list(folder.iterdir()) == []
    assert export_safetensors(uri, folder / "ck.safetensors") == str(folder / "ck.safetensors")


def test_a_checkpoint_of_another_format_version_is_not_set_aside(tmp_path: Path) -> None:
    """A format this version cannot read may be fine for another: it still counts as there."""
    model, masks = masked_net()
    uri = save_sparse(model, tmp_path / "ck", masks=masks)
    manifest = Path(uri, "manifest.json")
    doc = json.loads(manifest.read_text())
    doc["format_version"] = 99
    manifest.write_text(json.dumps(doc))
    with pytest.raises(CheckpointExistsError, match="already holds a checkpoint"):
        save_sparse(model, uri, masks=masks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
