"""Atomic commit: a writer killed (SIGKILL) half-way through a save leaves the previous
checkpoint loadable and no half-written one visible."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from fixtures_s3 import StorageRoot, masked_net

from granet_ray.store import (
    CheckpointNotFoundError,
    latest_checkpoint,
    list_checkpoints,
    load_sparse,
    save_sparse,
    storage,
)


def _writer(uri: str, options: dict | None, stop: str, marker: Path, model, masks) -> None:
    """Save ``model`` over ``uri`` but hang at ``stop``, announced by ``marker``: "data" after
    the first data file (locally only half of it), "replace" when the temp manifest is
    complete and os.replace is due. Runs in a forked child, so it computes nothing with torch
    (torch's thread pool does not survive a fork): the model comes built from the parent."""

    def hang(*args: object) -> None:
        marker.touch()
        time.sleep(600)

    def write_one_file(self: storage.Storage, files: dict[str, bytes]) -> None:
        name, data = next(iter(files.items()))
        if self.local:
            os.makedirs(self.location.path, exist_ok=True)
            with open(os.path.join(self.location.path, name), "wb") as f:
                f.write(data[: len(data) // 2])
        else:
            self.fs.pipe_file(self._path(name), data)
        hang()

    if stop == "data":
        storage.Storage.put_new = write_one_file
    else:
        storage.os.replace = hang
    save_sparse(
        model, uri, masks=masks, metadata={"step": 2}, overwrite=True, storage_options=options
    )


def kill_mid_save(uri: str, options: dict | None, stop: str, tmp_path: Path) -> None:
    """Run a writer process saving masked_net(seed=1) until it reaches ``stop`` ("data" /
    "replace"), then SIGKILL it."""
    marker = tmp_path / f"reached-{stop}"
    model, masks = masked_net(seed=1)
    process = multiprocessing.get_context("fork").Process(
        target=_writer, args=(uri, options, stop, marker, model, masks), daemon=True
    )
    process.start()
    deadline = time.monotonic() + 120
    while not marker.exists():
        if not process.is_alive():
            raise AssertionError(f"writer exited early with {process.exitcode}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("writer never reached the kill point")
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.join(30)
    assert process.exitcode == -signal.SIGKILL


def _assert_is(uri: str, options: dict | None, seed: int) -> None:
    model, masks = masked_net(seed=seed)
    loaded = load_sparse(uri, storage_options=options)
    for name, tensor in model.state_dict().items():
        assert loaded.state_dict[name].equal(tensor), name
    for name, mask in masks.items():
        assert loaded.masks[name].equal(mask)


def test_killed_overwrite_keeps_the_previous_checkpoint(
    storage_root: StorageRoot, tmp_path: Path
) -> None:
    model, masks = masked_net(seed=0)
    uri = save_sparse(
        model, storage_root.uri("ck"), masks=masks, metadata={"step": 1}, **_opts(storage_root)
    )
    kill_mid_save(uri, storage_root.options, "data", tmp_path)
    _assert_is(uri, storage_root.options, seed=0)
    assert list_checkpoints(storage_root.base, storage_root.options) == [uri]
    # the next save commits normally over the leftovers
    new, new_masks = masked_net(seed=1)
    save_sparse(new, uri, masks=new_masks, overwrite=True, **_opts(storage_root))
    _assert_is(uri, storage_root.options, seed=1)


def test_killed_first_save_is_invisible(storage_root: StorageRoot, tmp_path: Path) -> None:
    model, masks = masked_net(seed=0)
    old = save_sparse(
        model,
        storage_root.uri("run", "a"),
        masks=masks,
        metadata={"step": 1},
        **_opts(storage_root),
    )
    fresh = storage_root.uri("run", "b")
    kill_mid_save(fresh, storage_root.options, "data", tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="manifest.json is missing"):
        load_sparse(fresh, storage_options=storage_root.options)
    assert latest_checkpoint(storage_root.uri("run"), storage_root.options) == old


def test_killed_before_the_manifest_swap(tmp_path: Path) -> None:
    model, masks = masked_net(seed=0)
    uri = save_sparse(model, tmp_path / "ck", masks=masks, metadata={"step": 1})
    kill_mid_save(uri, None, "replace", tmp_path)
    leftovers = [p.name for p in Path(uri).iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the complete temp manifest of the killed writer is there"
    _assert_is(uri, None, seed=0)
    assert list_checkpoints(tmp_path) == [uri]


def _opts(root: StorageRoot) -> dict:
    return {"storage_options": root.options}
