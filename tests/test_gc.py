"""Orphaned checkpoint data (``granet_ray.store.gc``, ``granet-ray ckpt gc``): a save killed
before its manifest leaves data files no reader looks at; gc lists them (dry run), deletes
them with ``--yes``, keeps files younger than ``--min-age`` (a save in flight) and never
touches committed checkpoints or anything that is not checkpoint data; a resumed run
removes the old ones itself."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fixtures_s3 import StorageRoot, storage_root  # noqa: F401
from tiny import one_thread, tiny_train  # noqa: F401

from granet_ray.cli import main
from granet_ray.config import RunSettings
from granet_ray.local import fit_local
from granet_ray.store import list_checkpoints, load_sparse, open_storage
from granet_ray.store.gc import RESUME_MIN_AGE_S, collect_orphans, find_orphans
from granet_ray.store.storage import Storage

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = {"device": "cpu", "progress": False, "summary": False}


def killed_save(settings: RunSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``settings`` until its second checkpoint, killed (an exception) as that save was
    about to commit its manifest: its data files stay without one."""
    put = Storage.put
    saves = {"n": 0}

    def dying_put(self: Storage, name: str, data: bytes) -> None:
        if name == "manifest.json":
            saves["n"] += 1
            if saves["n"] == 2:
                raise KeyboardInterrupt
        put(self, name, data)

    with monkeypatch.context() as patch:
        patch.setattr(Storage, "put", dying_put)
        with pytest.raises(KeyboardInterrupt):
            fit_local(tiny_train(), settings, **QUIET)


def test_gc_after_a_killed_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = RunSettings(storage_path=str(tmp_path), name="k", checkpoint_every_steps=2)
    killed_save(settings, monkeypatch)
    run = Path(settings.run_uri)
    half = run / "checkpoint_epoch_0001"  # step 3: the second save
    data = sorted(p.name for p in half.iterdir())
    assert data and "manifest.json" not in data
    committed = list_checkpoints(settings.run_uri)
    assert [Path(u).name for u in committed] == ["checkpoint_epoch_0000_step_0002"]
    # a stray data file beside a committed manifest is an orphan too; other files never are
    stray = Path(committed[0], "model-dense-float32.0123456789ab.arrow")
    stray.write_bytes(b"x")
    (run / "notes.0123456789ab.arrow.txt").write_text("not checkpoint data")

    assert main(["ckpt", "gc", settings.run_uri]) == 0  # fresh files: a save may be in flight
    assert "would delete (dry run; --yes deletes) 0 orphaned file(s)" in capsys.readouterr().out
    assert main(["ckpt", "gc", settings.run_uri, "--min-age", "0"]) == 0
    shown = capsys.readouterr().out
    assert f"would delete (dry run; --yes deletes) {len(data) + 1} orphaned" in shown
    assert all(name in shown for name in data) and stray.name in shown
    assert sorted(p.name for p in half.iterdir()) == data  # a dry run deletes nothing

    assert main(["ckpt", "gc", settings.run_uri, "--min-age", "0", "--yes"]) == 0
    assert f"deleted {len(data) + 1} orphaned file(s)" in capsys.readouterr().out
    assert not half.exists() and not stray.exists()
    assert (run / "notes.0123456789ab.arrow.txt").exists() and (run / "tb").is_dir()
    load_sparse(committed[0])  # the committed checkpoint verifies
    assert main(["ckpt", "gc", str(tmp_path / "k" / "x"), "--min-age", "-1"]) == 2


def test_a_resumed_run_removes_old_orphans_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = RunSettings(
        storage_path=str(tmp_path), name="r", checkpoint_every_steps=2, tensorboard=False
    )
    killed_save(settings, monkeypatch)
    half = Path(settings.run_uri, "checkpoint_epoch_0001")
    old = time.time() - RESUME_MIN_AGE_S - 60
    files = sorted(half.iterdir())
    os.utime(files[0], (old, old))  # only this one is old enough
    fit_local(tiny_train(), settings, **QUIET)
    # the resumed run wrote checkpoint_epoch_0001 again; only the young orphans remain
    left = [o.name.rpartition("/")[2] for o in find_orphans(settings.run_uri, min_age_s=0)]
    assert files[0].name not in left and sorted(left) == sorted(p.name for p in files[1:])


def test_gc_on_local_disk_and_s3(storage_root: StorageRoot) -> None:  # noqa: F811
    run = open_storage(storage_root.uri("run"), storage_root.options)
    run.put("checkpoint_epoch_0001/model-dense-float32.0123456789ab.arrow", b"data")
    run.put("checkpoint_epoch_0001.damaged-20260101T000000Z/a.0123456789ab.arrow", b"x")
    run.put("history.json", b"{}")
    orphans = find_orphans(run.uri, storage_root.options, min_age_s=0)
    assert [o.name for o in orphans] == [
        "checkpoint_epoch_0001/model-dense-float32.0123456789ab.arrow"
    ]
    assert find_orphans(run.uri, storage_root.options, min_age_s=3600) == []
    collect_orphans(run.uri, storage_root.options, min_age_s=0)
    assert sorted(run.list()) == [
        "checkpoint_epoch_0001.damaged-20260101T000000Z/a.0123456789ab.arrow",
        "history.json",
    ]
