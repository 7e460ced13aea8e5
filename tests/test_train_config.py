"""The Ray run's configuration and checkpoint glue, without Ray: run settings, storage,
flags -> configs, preflight checks, resume checks, RNG states, the plot."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pyarrow.fs
import pytest
import torch

from granet_ray.config import ConfigError, TrainConfig, preset
from granet_ray.loop import seed_everything
from granet_ray.plots import training_plot
from granet_ray.train import RunSettings, build_trainer
from granet_ray.train.jobs import common_parser, run_settings, train_config, with_epochs
from granet_ray.train.preflight import preflight, steps_per_epoch
from granet_ray.train.progress import epoch_line
from granet_ray.train.settings import (
    ray_storage_path,
    run_uri,
    storage_filesystem,
    storage_uri,
)
from granet_ray.train.state import (
    check_resumable,
    checkpoint_metadata,
    rng_state,
    set_rng_state,
    worker_seed,
)

S3 = {"endpoint_url": "http://127.0.0.1:9000", "key": "AK", "secret": "SK"}


def test_run_settings_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GRANET_RAY_STORAGE", raising=False)
    run = RunSettings()
    assert (run.num_workers, run.gpus_per_worker, run.cpus_per_worker) == (2, 0.0, 1.0)
    assert run.storage_path == str(Path("~/granet-ray/runs").expanduser())
    assert (run.name, run.checkpoint_every, run.max_failures) == (None, 1, 0)
    monkeypatch.setenv("GRANET_RAY_STORAGE", str(tmp_path))
    assert RunSettings().storage_path == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert RunSettings(storage_path="runs").storage_path == str(tmp_path / "runs")
    assert RunSettings.from_dict(run.to_dict()) == run


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_workers": 0}, "num_workers"),
        ({"num_workers": 1.5}, "num_workers"),
        ({"gpus_per_worker": -0.5}, "gpus_per_worker"),
        ({"cpus_per_worker": 0}, "cpus_per_worker"),
        ({"storage_path": ""}, "storage_path"),
        ({"storage_path": "gs://bucket/x"}, "storage_path"),
        ({"storage_path": "s3://"}, "storage_path"),
        ({"storage_options": S3}, "storage_options"),  # options without s3://
        ({"storage_path": "s3://b/p", "storage_options": {"region": "x"}}, "storage_options"),
        ({"name": "a b"}, "name"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"max_failures": -2}, "max_failures"),
    ],
)
def test_run_settings_reject_bad_values_naming_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}="):
        RunSettings(**changes)


def test_unknown_run_setting_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown run setting.*gpus"):
        RunSettings.from_dict({"gpus": 1})


def test_s3_storage_with_a_custom_endpoint() -> None:
    run = RunSettings(storage_path="s3://bucket/prefix", storage_options=S3, name="r1")
    fs = storage_filesystem(run)
    assert isinstance(fs, pyarrow.fs.S3FileSystem)
    assert ray_storage_path(run) == "bucket/prefix"  # the path on that filesystem
    assert storage_uri(run, "bucket/prefix/r1/checkpoint_epoch_0001") == (
        "s3://bucket/prefix/r1/checkpoint_epoch_0001"
    )
    assert run_uri(run) == "s3://bucket/prefix/r1"
    default_chain = RunSettings(storage_path="s3://bucket/prefix")
    assert storage_filesystem(default_chain) is None  # Ray resolves s3:// itself
    assert ray_storage_path(default_chain) == "s3://bucket/prefix"
    local = RunSettings(storage_path="/tmp/x", name="r2")
    assert storage_filesystem(local) is None and run_uri(local) == "/tmp/x/r2"


def test_with_epochs_scales_the_epoch_based_schedule() -> None:
    imagenet = preset("imagenet_resnet50")
    short = with_epochs(imagenet, 10)
    assert short.epochs == 10 and short.lr_milestones == (3, 6, 9)
    assert short.warmup_epochs == pytest.approx(0.5)
    assert short.granet.prune_end == pytest.approx(3.0)
    assert with_epochs(imagenet, 100) is imagenet
    tiny = with_epochs(imagenet, 2)
    assert tiny.lr_milestones == (1, 2)  # 0.6, 1.2, 1.8 rounded within [1, 2], merged


def _args(*flags: str) -> argparse.Namespace:
    parser = common_parser("test")
    parser.add_argument("--data-root")
    return parser.parse_args(list(flags))


def test_flags_override_the_preset_and_build_run_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = _args(
        "--epochs", "4", "--final-density", "0.05", "--method", "gmp", "--batch-size", "16",
        "--train-size", "100", "--num-workers", "3", "--storage", "s3://b/p",
        "--s3-endpoint", "http://127.0.0.1:9", "--name", "x", "--max-failures", "2",
    )  # fmt: skip
    train = train_config(preset("mnist_demo"), args)
    assert (train.epochs, train.batch_size, train.train_size) == (4, 16, 100)
    assert (train.granet.method, train.granet.final_density) == ("gmp", 0.05)
    assert train.granet.prune_end == pytest.approx(2.0)  # 4 of 8 epochs, scaled to 4
    assert train.lr == preset("mnist_demo").lr  # not given: the preset's
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    run = run_settings(args)
    assert (run.num_workers, run.storage_path, run.name, run.max_failures) == (
        3,
        "s3://b/p",
        "x",
        2,
    )
    assert run.storage_options == {
        "endpoint_url": "http://127.0.0.1:9",
        "key": "AK",
        "secret": "SK",
    }


def test_preflight_runs_the_real_checks_before_any_worker() -> None:
    assert steps_per_epoch(4000, 64, 2) == 32
    preflight(preset("mnist_demo"), 2)
    with pytest.raises(ConfigError, match="model='resnet18' is invalid"):
        preflight(preset("mnist_demo").replace(model="resnet18"), 2)
    with pytest.raises(ConfigError, match="dataset='mnist' is invalid"):
        preflight(preset("mnist_demo").replace(dataset="mnist"), 2)
    with pytest.raises(ConfigError, match="data_root=None is invalid"):
        preflight(preset("cifar10_resnet20"), 2)
    with pytest.raises(ConfigError, match="model='resnet20' does not accept dataset='mnist5k'"):
        preflight(preset("mnist_demo").replace(model="resnet20"), 2)
    # 4000 samples on 8 workers: 8 steps per epoch, no update in a 4-epoch window of dT 40.
    with pytest.raises(ConfigError, match="hold no mask update"):
        preflight(preset("mnist_demo").replace(batch_size=64, granet={"update_interval": 40}), 8)


def test_build_trainer_checks_before_ray_is_needed() -> None:
    with pytest.raises(ConfigError, match="epochs=0 is invalid"):
        build_trainer(preset("mnist_demo").replace(epochs=0), RunSettings())
    with pytest.raises(ConfigError, match="data_root"):
        build_trainer(preset("imagenet_resnet50"), RunSettings())


def _metadata(train: TrainConfig, world_size: int = 2) -> dict:
    return checkpoint_metadata(
        train=train,
        epoch=1,
        world_size=world_size,
        engine_state={"step": 4, "masks": {"w": torch.ones(2)}, "density_steps": {}, "history": []},
        summary={"density": 0.5},
        epochs=[{"epoch": 1}],
        scheduler={"last_epoch": 4},
        scaler=None,
        rng=[rng_state(), rng_state()],
    )


def test_checkpoint_metadata_is_json_without_masks() -> None:
    meta = _metadata(preset("mnist_demo"))
    assert json.loads(json.dumps(meta)) == meta
    assert "masks" not in meta["engine"] and meta["step"] == 4


def test_resume_needs_the_same_config_and_worker_count() -> None:
    train = preset("mnist_demo")
    check_resumable(json.loads(json.dumps(_metadata(train))), train, 2)
    with pytest.raises(ConfigError, match="^num_workers=3 is invalid"):
        check_resumable(_metadata(train), train, 3)
    changed = train.replace(lr=0.1, granet={"final_density": 0.2})
    with pytest.raises(ConfigError, match=r"^granet\.final_density, lr differ"):
        check_resumable(_metadata(train), changed, 2)
    with pytest.raises(ConfigError, match="not written by granet-ray-train"):
        check_resumable({"kind": "other"}, train, 2)


def test_rng_states_restore_exactly() -> None:
    seed_everything(3)
    state = json.loads(json.dumps(rng_state()))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # move on
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_training_plot_is_a_png() -> None:
    history = [{"step": 20, "density": 0.3}, {"step": 40, "density": 0.1}]
    epochs = [
        {"step": 32, "density": 0.3, "val_accuracy": 0.9, "train_accuracy": 0.8},
        {"step": 64, "density": 0.1, "val_accuracy": 0.95, "train_accuracy": 0.97},
    ]
    png = training_plot(history, epochs, start_density=0.5)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_epoch_line() -> None:
    line = epoch_line(
        {
            "epoch": 2,
            "step": 64,
            "train_loss": 0.2,
            "train_accuracy": 0.95,
            "val_loss": 0.3,
            "val_accuracy": 0.932,
            "density": 0.15,
            "inference_flops": 0.2,
            "samples_per_second": 250.0,
        }  # fmt: skip
    )
    assert "epoch   2 step      64" in line and "val loss 0.3000 acc 93.20%" in line


def test_worker_seeds_differ_by_rank_and_repeat() -> None:
    seeds = [worker_seed(7, rank) for rank in range(4)]
    assert len(set(seeds)) == 4 and seeds == [worker_seed(7, rank) for rank in range(4)]
    assert worker_seed(8, 0) not in seeds
