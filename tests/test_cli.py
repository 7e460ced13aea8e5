"""The ``granet-ray`` command line on real checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_s3 import masked_net
from safetensors import safe_open
from safetensors.torch import load_file

from granet_ray.cli import main
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


@pytest.mark.s3
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
    from granet_ray.cli import main

    assert main(["train", "--final-density", "1.5"]) == 2
    assert "final_density=1.5 is invalid" in capsys.readouterr().err
