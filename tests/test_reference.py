"""Models and datasets by reference (``pkg.module:factory``, ``timm:<name>``), without Ray: a
user package written outside the repository, trained through ``granet-ray train`` in this
process; every bad reference ends with its one-line error before anything trains (and, for
``fit``, before Ray is contacted); sweeps accept references on the command line and in grid
files."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from user_package import write_user_package

from granet_ray import cli
from granet_ray.config import ConfigError, TrainConfig
from granet_ray.data import build_datasets
from granet_ray.models import build_model
from granet_ray.recipe import evaluate_model
from granet_ray.store import latest_checkpoint, load_sparse

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--epochs", "2", "--global-batch", "32", "--update-interval", "2"]
SMALL += ["--prune-window", "0:1", "--set", "granet.init_density=0.5", "--final-density", "0.2"]
SMALL += ["--precision", "fp32", "--no-channels-last", "--no-progress"]


@pytest.fixture
def userpkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``userpkg`` in a folder outside the repository, importable here."""
    folder = write_user_package(tmp_path / "project")
    assert REPO not in folder.parents
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    write_user_package(folder)  # forget the imported modules


BAD = [
    ("--model", "nosuchpkg.nets:vit", "no module named 'nosuchpkg'"),
    ("--model", "userpkg.nets:missing", "userpkg.nets has no attribute 'missing'"),
    ("--model", "userpkg.nets:NOT_CALLABLE", "is a int, not a callable factory"),
    ("--model", "userpkg.nets:raises", "raised RuntimeError: this factory needs a GPU"),
    ("--model", "userpkg.nets:not_a_model", "the factory returned a str, not a torch nn.Module"),
    ("--model", "userpkg.nets:ten_classes", "returns shape [2, 10] for a batch of 2"),
    ("--model", "timm:no_such_net", "timm has no such model"),
    ("--model", "userpkg.nets", "must be one of"),
    ("--dataset", "userpkg.data:no_len", "the train split (NoLength) has no __len__"),
    ("--dataset", "userpkg.data:bad_labels", "label 4 (sample 37) is outside [0, num_classes=4)"),
    ("--dataset", "userpkg.data:numpy_inputs", "is a ndarray, not a torch.Tensor"),
    ("--dataset", "userpkg.data:wrong_type", "not (train_dataset, test_dataset, num_classes)"),
    ("--dataset", "userpkg.data:raises", "raised FileNotFoundError: no dataset under None"),
]  # fmt: skip


@pytest.mark.parametrize(("flag", "reference", "why"), BAD, ids=[b[1] for b in BAD])
def test_a_bad_reference_is_one_error_line_naming_it(
    userpkg: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    flag: str,
    reference: str,
    why: str,
) -> None:
    other = (
        ["--dataset", "userpkg.data:blobs"]
        if flag == "--model"
        else ["--model", "userpkg.nets:vit"]
    )
    argv = ["train", flag, reference, *other, *SMALL, "--storage", str(tmp_path / "runs")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    field = flag.removeprefix("--")
    assert err.startswith(f"error: {field}={reference!r} is invalid: "), err
    assert why in err and len(err.splitlines()) == 1, err


def test_fit_refuses_a_bad_reference_before_ray_starts(
    userpkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was contacted")

    monkeypatch.setattr("granet_ray.train.trainer.connect", no_ray)
    argv = ["fit", "--model", "userpkg.nets:raises", "--dataset", "userpkg.data:blobs", *SMALL]
    assert cli.main([*argv, "--num-workers", "2", "--storage", str(tmp_path)]) == 2
    assert "error: model='userpkg.nets:raises' is invalid: " in capsys.readouterr().err


def test_timm_models_by_name_and_a_clear_error_without_timm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = build_model("timm:convnext_atto", num_classes=3)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'granet-ray\[timm\]'"):
        build_model("timm:convnext_atto", num_classes=3)


def test_a_user_dataset_class_and_factory(userpkg: Path) -> None:
    data = build_datasets("userpkg.data:blobs", train_size=100, seed=1)
    assert (len(data.train), len(data.test), data.num_classes) == (100, 64, 4)
    assert data.input_shape == (1, 8, 8)


def test_train_in_process_prunes_attention_and_loads_back(
    userpkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``granet-ray train`` on the user's ViT and dataset: exact final density, attention
    projections pruned, the patch embedding kept dense by pattern, and the checkpoint loaded
    with load_sparse into the user's own model reproduces the run's test metrics."""
    argv = ["train", "--model", "userpkg.nets:vit", "--dataset", "userpkg.data:blobs", *SMALL]
    argv += ["--optimizer", "adamw", "--lr", "0.003", "--lr-schedule", "cosine"]
    argv += ["--grad-clip", "1.0", "--keep-dense", "patch*", "--device", "cpu"]
    assert cli.main([*argv, "--storage", str(tmp_path), "--name", "vit"]) == 0
    out = capsys.readouterr().out
    assert "patch.weight (dense: keep_dense 'patch*')" in out
    uri = latest_checkpoint(str(tmp_path / "vit"))
    checkpoint = load_sparse(uri)
    masks = checkpoint.masks
    assert "patch.weight" not in masks
    attention = [n for n in masks if n.endswith("in_proj_weight")]
    assert attention == ["blocks.0.attn.in_proj_weight", "blocks.1.attn.in_proj_weight"]
    assert all(masks[n].float().mean() < 1 for n in attention)
    active = sum(int(m.sum()) for m in masks.values())
    assert active == math.floor(0.2 * sum(m.numel() for m in masks.values()) + 1e-9)  # exactly d_f
    train = TrainConfig.from_dict(checkpoint.metadata["train"])
    assert (train.model, train.dataset, train.optimizer) == (
        "userpkg.nets:vit",
        "userpkg.data:blobs",
        "adamw",
    )

    model = build_model("userpkg.nets:vit", num_classes=4)
    load_sparse(uri, model=model)
    data = build_datasets("userpkg.data:blobs", seed=0)
    result = evaluate_model(model, DataLoader(data.test, batch_size=64), device=torch.device("cpu"))
    final = checkpoint.metadata["epochs"][-1]
    assert result.accuracy == final["val_accuracy"]
    assert result.loss == pytest.approx(final["val_loss"], rel=1e-5)


def test_sweep_takes_references_from_flags_and_grid_files(
    userpkg: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: mine\nbase: mnist_demo\n"
        "train: {model: 'userpkg.nets:depthwise', dataset: 'userpkg.data:blobs', epochs: 2,"
        " global_batch: 32, keep_dense: 'stem.*'}\n"
        "variants: {granet: {method: granet}}\n"
        "grid: {final_density: [0.2, 0.1], update_interval: [2], prune_window: [[0, 1]]}\n"
        "asha: null\n"
    )
    argv = ["sweep", "--grid", str(grid), "--dry-run", "--storage", str(tmp_path)]
    assert cli.main(argv) == 0
    assert "2 trials (dry run)" in capsys.readouterr().out
    argv += ["--model", "userpkg.nets:vit", "--optimizer", "adamw", "--keep-dense", "nowhere*"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "keep_dense=('nowhere*',) is invalid: 'nowhere*' matches no" in err
