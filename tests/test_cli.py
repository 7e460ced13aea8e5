"""The ``granet-ray`` command line: flags -> configs (one meaning everywhere), errors as one
line, and the checkpoint commands on real checkpoints."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_s3 import masked_net
from safetensors import safe_open
from safetensors.torch import load_file

from granet_ray.cli import build_parser, describe, grid_overrides, main, recipe, run_settings
from granet_ray.config import ConfigError, preset, with_epochs
from granet_ray.store import save_sparse


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[str, torch.nn.Module]:
    model, masks = masked_net()
    return save_sparse(model, tmp_path / "ck", masks=masks, metadata={"step": 3}), model


def test_inspect_prints_the_table_and_totals(checkpoint, capsys) -> None:
    uri, model = checkpoint
    assert main(["ckpt", "inspect", uri]) == 0
    out = capsys.readouterr().out
    for column in ("tensor", "shape", "density", "bytes", "share"):
        assert column in out
    for name in model.state_dict():
        assert name in out
    _, masks = masked_net()
    density = f"{masks['0.weight'].float().mean():.3f}"
    assert "│ 0.weight " in out and f"│ 8x3x3x3  │   {density} │" in out
    dense = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert "against dense" in out and f"({dense} bytes)" in out
    assert "verified:" in out and "sha256 match" in out


def test_inspect_reports_a_damaged_checkpoint_as_an_error(checkpoint, capsys) -> None:
    uri, _ = checkpoint
    data = sorted(Path(uri).glob("model-csr-*.arrow"))[0]
    data.write_bytes(data.read_bytes()[:-5])  # truncated
    assert main(["ckpt", "inspect", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "truncated" in err and "Traceback" not in err
    assert main(["ckpt", "inspect", uri, "--no-verify"]) == 0  # the manifest alone is fine


def test_inspect_on_s3_with_storage_options(seaweedfs, s3_prefix, capsys) -> None:
    model, masks = masked_net()
    uri = save_sparse(model, s3_prefix, masks=masks, storage_options=seaweedfs.storage_options)
    options = [f"--storage-option={k}={v}" for k, v in seaweedfs.storage_options.items()]
    assert main(["ckpt", "inspect", uri, *options]) == 0
    assert "0.weight" in capsys.readouterr().out


def test_export_writes_dense_safetensors(checkpoint, tmp_path: Path, capsys) -> None:
    uri, model = checkpoint
    out = tmp_path / "dense.safetensors"
    assert main(["ckpt", "export", uri, str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    tensors = load_file(out)
    assert tensors.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensors[name], tensor), name
    with safe_open(out, "pt") as f:
        assert f.metadata()["source"] == uri
    assert main(["ckpt", "export", uri, str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["ckpt", "export", uri, str(out), "--overwrite"]) == 0


def test_errors_are_one_red_line_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "granet_ray.cli", "ckpt", "inspect", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env={"FORCE_COLOR": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.json is missing" in lines[0]
    assert "\x1b[31m" in lines[0], "printed in red"


def test_bad_storage_option_and_usage(checkpoint, capsys) -> None:
    uri, _ = checkpoint
    assert main(["ckpt", "inspect", "s3://bucket/ck", "--storage-option", "novalue"]) == 2
    assert "must look like key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["ckpt"])
    assert exited.value.code == 2


def test_train_command_rejects_a_bad_flag_naming_the_field(capsys) -> None:
    assert main(["train", "--final-density", "1.5"]) == 2
    assert "final_density=1.5 is invalid" in capsys.readouterr().err


def _args(command: str, *flags: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *flags])


def test_recipe_flags_mean_the_same_in_train_and_fit() -> None:
    flags = (
        "--preset",
        "imagenet_resnet50",
        "--data-root",
        "/d",
        "--epochs",
        "10",
        "--global-batch",
        "256",
        "--lr",
        "0.3",
        "--final-density",
        "0.1",
        "--prune-window",
        "0:2",
        "--precision",
        "bf16",
        "--max-batch-per-worker",
        "32",
    )
    train_cfg, changed = recipe(_args("train", *flags))
    fit_cfg, _ = recipe(_args("fit", *flags))
    assert train_cfg == fit_cfg
    scaled = with_epochs(preset("imagenet_resnet50"), 10)
    assert train_cfg.epochs == 10 and train_cfg.lr_milestones == scaled.lr_milestones
    assert train_cfg.global_batch == 256 and train_cfg.lr == 0.3  # explicit after scaling
    assert train_cfg.granet.update_interval == scaled.granet.update_interval // 2  # B / B'
    assert (train_cfg.granet.prune_start, train_cfg.granet.prune_end) == (0, 2)
    assert (train_cfg.precision, train_cfg.max_batch_per_worker) == ("bf16", 32)
    assert "global_batch: 128 -> 256" in changed and "epochs: 100 -> 10" in changed


def test_synthetic_is_a_smoke_run_of_the_presets_shape() -> None:
    train, _ = recipe(_args("fit", "--preset", "imagenet_resnet50", "--synthetic"))
    assert train.dataset == "synthetic_imagenet" and train.train_size == 64
    assert (train.epochs, train.global_batch, train.granet.update_interval) == (2, 16, 2)
    bigger, _ = recipe(_args("fit", "--preset", "cifar10_resnet20", "--synthetic", "--epochs", "3"))
    assert bigger.dataset == "synthetic_cifar10" and bigger.epochs == 3


def test_scale_and_storage_flags_build_run_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    args = _args(
        "fit",
        "--num-workers",
        "3",
        "--storage",
        "s3://b/p",
        "--s3-endpoint",
        "http://127.0.0.1:9",
        "--name",
        "x",
        "--max-failures",
        "2",
        "--checkpoint-every-steps",
        "100",
    )
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
    assert (run.cpus_per_worker, run.checkpoint_every_steps) == (1.0, 100)
    sweep = run_settings(_args("sweep", "--storage", "/tmp/x"), sweep=True)
    assert sweep.cpus_per_worker == pytest.approx(0.99)  # the trial's driver holds 0.01
    assert _args("sweep").max_failures == _args("fit").max_failures == 1  # one default


def test_sweep_flags_replace_the_grid_files_fields() -> None:
    args = _args(
        "sweep",
        "--epochs",
        "4",
        "--global-batch",
        "64",
        "--final-density",
        "0.1",
        "0.05",
        "--method",
        "gmp",
        "rigl",
        "--seeds",
        "0",
        "1",
        "--no-asha",
    )
    overrides = grid_overrides(args)
    assert overrides["train"] == {"epochs": 4, "global_batch": 64}
    assert overrides["grid"] == {"granet.final_density": [0.1, 0.05]}
    assert overrides["variants"] == {
        "gmp": {"granet.method": "gmp"},
        "rigl": {"granet.method": "rigl"},
    }
    assert overrides["seeds"] == [0, 1] and overrides["asha"] is None


def test_describe_finds_the_root_cause_inside_ray_errors() -> None:
    class WorkerGroupError(RuntimeError):
        def __init__(self, failures: dict[int, BaseException]) -> None:
            super().__init__("Training failed due to worker errors:\n...")
            self.worker_failures = failures

    missing = FileNotFoundError("dataset 'imagenet': expected the folder /d/train")
    wrapped = RuntimeError("task failed")
    wrapped.__cause__ = missing
    assert describe(WorkerGroupError({0: wrapped})) == f"FileNotFoundError: {missing}"
    bad = ConfigError("lr=-1 is invalid: must be a finite number > 0")
    assert describe(WorkerGroupError({1: bad})) == str(bad)
