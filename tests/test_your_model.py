"""A user's own model, data and loop on 2 Ray workers: a package written outside the
repository trained through ``granet-ray fit`` (a process of its own, started in the user's
project folder, as a user runs it) and through Python's ``fit`` (the workers importing it
through a runtime env), and ``examples/own_loop_transformer.py`` (a user's own
``TorchTrainer`` with ``granet_ray.train.prepare_engine`` / ``report`` / ``restore``) with a
worker killed mid-run. Every run ends at its exact final density with identical masks on both
workers, and its checkpoint, loaded with ``load_sparse`` into the user's own model, gives the
run's own outputs."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray.cloudpickle as cloudpickle
import torch
from fixtures_ray import RAY_ENV
from torch.utils.data import DataLoader
from user_package import write_user_package

from granet_ray.config import GraNetConfig, RunSettings, TrainConfig
from granet_ray.data import build_datasets
from granet_ray.models import build_model
from granet_ray.recipe import evaluate_model
from granet_ray.store import latest_checkpoint, load_sparse
from granet_ray.train import fit

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's project folder (outside the repository) holding ``userpkg``."""
    folder = write_user_package(tmp_path / "project")
    assert REPO not in folder.parents
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    write_user_package(folder)


def reproduces(uri: str, model: str, dataset: str, metrics: dict) -> torch.nn.Module:
    """Load the checkpoint into a fresh user model and check that its test loss and accuracy
    are the run's own final ones; returns the model."""
    net = build_model(model, num_classes=4)
    load_sparse(uri, model=net)
    data = build_datasets(dataset, seed=0)
    result = evaluate_model(net, DataLoader(data.test, batch_size=64), device=torch.device("cpu"))
    assert result.accuracy == metrics["val_accuracy"]
    assert result.loss == pytest.approx(metrics["val_loss"], rel=1e-5)
    return net


@pytest.mark.ray  # its own private Ray, in the command's process
def test_fit_command_trains_a_user_transformer_on_2_workers(project: Path, tmp_path: Path) -> None:
    """``granet-ray fit --model userpkg.nets:vit --dataset userpkg.data:blobs`` run from the
    project folder: the driver finds the package in the current folder, the private Ray's
    workers too (Ray puts the driver's folder on their path)."""
    storage = tmp_path / "runs"
    argv = [str(BIN / "granet-ray"), "fit", "--model", "userpkg.nets:vit"]
    argv += ["--dataset", "userpkg.data:blobs", "--num-workers", "2", "--epochs", "2"]
    argv += ["--global-batch", "32", "--update-interval", "2", "--prune-window", "0:1"]
    argv += ["--set", "granet.init_density=0.5", "--final-density", "0.2", "--precision", "fp32"]
    argv += ["--optimizer", "adamw", "--lr", "0.003", "--lr-schedule", "cosine"]
    argv += ["--grad-clip", "1.0", "--keep-dense", "patch*", "--evaluate-checkpoint"]
    argv += ["--storage", str(storage), "--name", "vit", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    result = subprocess.run(
        argv, cwd=project, env={**env, **RAY_ENV}, capture_output=True, text=True, timeout=420
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "test accuracy of the sparse model" in result.stdout
    assert "patch.weight (dense: keep_dense 'patch*')" in result.stdout
    uri = latest_checkpoint(str(storage / "vit"))
    checkpoint = load_sparse(uri)
    meta = checkpoint.metadata
    assert meta["world_size"] == 2 and meta["train"]["model"] == "userpkg.nets:vit"
    masks = checkpoint.masks
    active = sum(int(m.sum()) for m in masks.values())
    assert active == math.floor(0.2 * sum(m.numel() for m in masks.values()) + 1e-9)  # exactly d_f
    for block in (0, 1):
        assert masks[f"blocks.{block}.attn.in_proj_weight"].float().mean() < 0.9
    assert "patch.weight" not in masks
    reproduces(uri, "userpkg.nets:vit", "userpkg.data:blobs", meta["epochs"][-1])


def test_python_fit_trains_a_depthwise_conv_net_through_a_runtime_env(
    ray_session: None, project: Path, tmp_path: Path
) -> None:
    train = TrainConfig(
        model="userpkg.nets:depthwise",
        dataset="userpkg.data:blobs",
        epochs=2,
        global_batch=32,
        lr=0.05,
        lr_milestones=(),
        precision="fp32",
        channels_last=False,
        granet=GraNetConfig(
            init_density=0.5, final_density=0.2, update_interval=2, prune_start=0, prune_end=1
        ),
    )
    run = RunSettings(num_workers=2, storage_path=str(tmp_path), name="depthwise")
    outcome = fit(
        train,
        run,
        progress=False,
        summary=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(project)}},
    )
    checkpoint = load_sparse(outcome.checkpoint_uri)
    total = sum(m.numel() for m in checkpoint.masks.values())
    assert outcome.metrics["density"] == math.floor(0.2 * total + 1e-9) / total  # exactly d_f
    depthwise = checkpoint.masks["mix.0.0.weight"]
    assert depthwise.shape == (16, 1, 3, 3) and depthwise.float().mean() < 1
    rows = {r["name"]: r for r in outcome.summary["layers"]}
    assert rows["mix.0.0.weight"]["kind"] == "conv" and rows["mix.0.0.weight"]["flops"] > 0
    reproduces(outcome.checkpoint_uri, train.model, train.dataset, outcome.metrics)


def load_example() -> object:
    """``examples/own_loop_transformer.py`` as a module whose functions and classes travel
    to the Ray workers by value (it is not an importable package)."""
    path = REPO / "examples" / "own_loop_transformer.py"
    spec = importlib.util.spec_from_file_location("own_loop_transformer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    return module


def test_own_loop_example_on_2_workers_resumes_a_killed_worker(
    ray_session: None, tmp_path: Path
) -> None:
    example = load_example()
    try:
        argv = ["--workers", "2", "--steps", "24", "--report-every", "4", "--update-interval"]
        argv += ["4", "--crash-at", "10", "--storage", str(tmp_path), "--name", "lm"]
        result = example.main(argv)
    finally:
        cloudpickle.unregister_pickle_by_value(example)
        del sys.modules["own_loop_transformer"]
    metrics = result.metrics
    assert (tmp_path / "lm.crashed").exists()  # worker 1 was killed after step 10 ...
    assert metrics["resumed_from"] == 8  # ... and the group went on from the step-8 checkpoint
    assert metrics["step"] == 24 and metrics["density"] == pytest.approx(0.2, abs=1e-4)
    first, second = metrics["mask_digests"]
    assert first == second  # the same masks on both workers
    checkpoint = load_sparse(result.checkpoint.path)
    assert checkpoint.metadata["state"] == {"step": 24}
    assert checkpoint.metadata["engine"]["step"] == 24
    assert any(n.endswith("self_attn.in_proj_weight") for n in checkpoint.masks)
    model = example.TinyLM()
    load_sparse(result.checkpoint.path, model=model)
    model.eval()
    with torch.no_grad():
        logits = model(example.probe_tokens())
    torch.testing.assert_close(logits.flatten(), torch.tensor(metrics["probe_logits"]))
