"""Checkpoint retention (``granet_ray.retention``): the pure choice of what to delete, the
store's ``delete_checkpoint`` (manifest first), and runs on local disk and S3 that keep the
newest N plus the best epoch through a crash and a resume, never losing what a resume
needs; a failed delete is a warning."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_s3 import StorageRoot, storage_root  # noqa: F401
from tiny import one_thread, tiny_train  # noqa: F401

from granet_ray.cli import build_parser, run_settings
from granet_ray.config import ConfigError, RunSettings
from granet_ray.local import fit_local
from granet_ray.recipe import Hooks, Run, StepInfo
from granet_ray.retention import best_checkpoint, to_delete
from granet_ray.store import (
    StorageError,
    delete_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_sparse,
    open_storage,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = "/runs/r"
NAMES = [
    f"{RUN}/checkpoint_epoch_0001",
    f"{RUN}/checkpoint_epoch_0001_step_0002",
    f"{RUN}/checkpoint_epoch_0002",
    f"{RUN}/checkpoint_epoch_0002_step_0002",
    f"{RUN}/checkpoint_epoch_0003",
]
EPOCHS = [
    {"epoch": 1, "val_accuracy": 0.5, "val_loss": 1.0},
    {"epoch": 2, "val_accuracy": 0.9, "val_loss": 2.0},
    {"epoch": 3, "val_accuracy": 0.7, "val_loss": 0.5},
]


def test_to_delete_keeps_the_newest_n_and_the_best_epoch() -> None:
    assert to_delete(NAMES, 2) == NAMES[:3]
    assert to_delete(NAMES, 2, "val_accuracy", EPOCHS) == [NAMES[0], NAMES[1]]
    assert to_delete(NAMES, 1, "val_loss", EPOCHS) == NAMES[:4]  # the best is the newest
    assert to_delete(NAMES, 10) == []
    # only epoch-end checkpoints are candidates; ties go to the newest
    tied = [{"epoch": e, "val_accuracy": 0.5} for e in (1, 2, 3)]
    assert best_checkpoint(NAMES[:4], "val_accuracy", tied) == NAMES[2]
    assert best_checkpoint(NAMES[1:2], "val_accuracy", EPOCHS) is None
    # folders not named like ours are never deleted
    assert to_delete([f"{RUN}/mine", *NAMES], 1) == NAMES[:4]


def test_settings_validate_retention() -> None:
    with pytest.raises(ConfigError, match="keep_checkpoints=0 is invalid"):
        RunSettings(keep_checkpoints=0)
    with pytest.raises(ConfigError, match="keep_best='epoch' is invalid"):
        RunSettings(keep_checkpoints=2, keep_best="epoch")
    with pytest.raises(ConfigError, match="unless keep_checkpoints is set"):
        RunSettings(keep_best="val_accuracy")


class Interrupt(Hooks):
    """Stops the run (an exception) after global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, run: Run, info: StepInfo) -> None:
        if info.step == self.step:
            raise KeyboardInterrupt


def test_delete_checkpoint_removes_the_manifest_first(tmp_path: Path) -> None:
    """A delete that fails after the manifest leaves no committed checkpoint behind; the
    store's delete removes the rest."""
    settings = RunSettings(storage_path=str(tmp_path), name="d", tensorboard=False)
    fit_local(tiny_train(epochs=1), settings, device="cpu", progress=False, summary=False)
    uri = latest_checkpoint(settings.run_uri)
    assert uri is not None
    open_storage(uri).delete("manifest.json")  # a delete interrupted after its first step
    assert list_checkpoints(settings.run_uri) == []
    assert delete_checkpoint(uri) == uri
    assert not Path(uri).exists()


def test_retention_through_a_crash_and_a_resume(storage_root: StorageRoot) -> None:  # noqa: F811
    """Three epochs of 3 steps with a checkpoint every 2 steps (9 checkpoints in all),
    keeping 2 plus the best: interrupted at step 6, the newest checkpoint (step 6's) is
    there to resume from; the resumed run ends bit for bit where an uninterrupted run ends,
    and at most 2 + 1 checkpoints remain."""
    train = tiny_train(epochs=3)
    quiet = {"device": "cpu", "progress": False, "summary": False}
    keep = {
        "keep_checkpoints": 2,
        "keep_best": "val_accuracy",
        "checkpoint_every_steps": 2,
        "tensorboard": False,
        "storage_path": storage_root.base,
        "storage_options": storage_root.options,
    }
    options = storage_root.options
    clean = fit_local(train, RunSettings(name="clean", **keep), **quiet)
    settings = RunSettings(name="cut", **keep)
    with pytest.raises(KeyboardInterrupt):
        fit_local(train, settings, hooks=[Interrupt(7)], **quiet)
    names = [u.rsplit("/", 1)[1] for u in list_checkpoints(settings.run_uri, options)]
    assert names[-1] == "checkpoint_epoch_0002"  # step 6: what the resume needs
    assert len(names) <= 3
    resumed = fit_local(train, settings, **quiet)
    left = list_checkpoints(settings.run_uri, options)
    assert 1 <= len(left) <= 3 and left[-1].endswith("checkpoint_epoch_0003")
    best = max(resumed.epochs, key=lambda m: (m["val_accuracy"], m["epoch"]))["epoch"]
    assert any(u.endswith(f"checkpoint_epoch_{best:04d}") for u in left)
    a = load_sparse(clean.checkpoint_uri, storage_options=options).state_dict
    b = load_sparse(resumed.checkpoint_uri, storage_options=options).state_dict
    assert all(bool((a[n] == b[n]).all()) for n in a)


def test_a_failed_delete_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(uri: str, storage_options: object = None) -> str:
        raise StorageError(f"cannot delete files in {uri}: permission denied")

    monkeypatch.setattr("granet_ray.retention.delete_checkpoint", refuse)
    settings = RunSettings(
        storage_path=str(tmp_path), name="w", keep_checkpoints=1, tensorboard=False
    )
    with pytest.warns(UserWarning, match="could not delete the old checkpoint .*permission"):
        outcome = fit_local(tiny_train(), settings, device="cpu", progress=False, summary=False)
    assert outcome.metrics["epoch"] == 2
    assert len(list_checkpoints(settings.run_uri)) == 2


def test_flags_set_retention_and_watching() -> None:
    args = build_parser().parse_args(
        ["fit", "--keep-checkpoints", "3", "--keep-best", "val_accuracy", "--no-tensorboard"]
        + ["--mlflow-uri", "http://127.0.0.1:5000", "--mlflow-experiment", "granet"]
    )
    settings = run_settings(args)
    assert (settings.keep_checkpoints, settings.keep_best) == (3, "val_accuracy")
    assert not settings.tensorboard
    assert (settings.mlflow_uri, settings.mlflow_experiment) == ("http://127.0.0.1:5000", "granet")
    defaults = run_settings(build_parser().parse_args(["train"]))
    assert defaults.keep_checkpoints is None and defaults.tensorboard
    assert defaults.mlflow_uri is None
