"""What a hostile user tried, each case kept as a test: requests Ray can never hold, Ctrl-C,
stale outcomes, lists and NumPy numbers where the config expects tuples and floats, preset
files and flags that contradict each other, hints that name flags, and unclear errors."""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures_ray import RAY_ENV
from tiny import tiny_train

from granet_ray.cli import build_parser, main
from granet_ray.config import (
    ConfigError,
    GraNetConfig,
    RunSettings,
    TrainConfig,
    load_preset_file,
    preset,
)
from granet_ray.local import fit_local
from granet_ray.store import latest_checkpoint, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "granet_ray"


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **RAY_ENV, "COLUMNS": "160"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "granet_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# ---- 1. a request Ray can never hold, and Ctrl-C -------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize(
    "scale",
    [("--num-workers", "3"), ("--num-workers", "1", "--cpus-per-worker", "4")],
    ids=["3-workers", "4-cpus"],
)
def test_a_fit_that_a_private_ray_can_never_hold_ends_with_one_error(
    scale: tuple[str, ...], tmp_path: Path
) -> None:
    began = time.monotonic()
    result = _cli("fit", "--epochs", "1", "--train-size", "512", *scale, "--storage", str(tmp_path))
    assert time.monotonic() - began < 60
    assert result.returncode == 2, result.stderr
    (line,) = _error_lines(result.stderr)
    assert "num_workers=" in line and "this Ray instance has 2 CPU in all" in line
    assert "Traceback" not in result.stderr


def test_the_capacity_check_counts_the_fewest_workers_an_elastic_run_accepts() -> None:
    from granet_ray.train.trainer import capacity_shortfall

    cluster = {"CPU": 2.0, "memory": 1e9}
    assert capacity_shortfall(RunSettings(num_workers=2, storage_path="/x"), cluster) is None
    elastic = RunSettings(num_workers=4, min_workers=2, storage_path="/x")
    assert capacity_shortfall(elastic, cluster) is None  # starts on 2, grows when it can
    gpu = RunSettings(num_workers=1, gpus_per_worker=1, storage_path="/x")
    assert "1 GPU" in (capacity_shortfall(gpu, cluster) or "")


@pytest.mark.ray
def test_ctrl_c_stops_a_fit_within_seconds_leaving_its_checkpoints(tmp_path: Path) -> None:
    env = {**os.environ, **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "granet_ray.cli", "fit", "--storage", str(tmp_path)]
    command += ["--name", "stopped", "--no-progress"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 180
        while not list_checkpoints(tmp_path / "stopped"):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        assert time.monotonic() - interrupted < 30
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert _error_lines(stderr) == ["error: interrupted"]
    assert latest_checkpoint(tmp_path / "stopped") is not None


# ---- 2. the outcome comes from the newest committed checkpoint -----------------------------


@pytest.mark.usefixtures("ray_session")
def test_the_outcome_is_the_newest_committed_checkpoint_not_rays_last_registered(
    tmp_path: Path,
) -> None:
    """The run's checkpoints were written without Ray's bookkeeping (as after an abort that
    went on committing): the Ray run resumes at the end, reports nothing, and its outcome is
    still the newest checkpoint of the folder."""
    from granet_ray.train import fit

    train = tiny_train()
    settings = RunSettings(storage_path=str(tmp_path), name="stale")
    done = fit_local(train, settings, device="cpu", progress=False, summary=False)
    outcome = fit(train, settings, progress=False, summary=False)
    assert outcome.checkpoint_uri == done.checkpoint_uri
    assert outcome.checkpoint_uri.endswith(f"checkpoint_epoch_{train.epochs:04d}")
    assert outcome.metrics == done.metrics


# ---- 6, 9, 11: values from Python, YAML and preset files ------------------------------------


def test_lists_and_numpy_numbers_are_normalised_at_construction() -> None:
    train = preset("mnist_demo").replace(lr_milestones=[1])
    assert train.lr_milestones == (1,) and hash(train) == hash(train.replace())
    g = GraNetConfig(final_density=np.float32(0.1), update_interval=np.int64(5))
    assert type(g.final_density) is float and type(g.update_interval) is int
    numbers = {"final_density": np.float32(0.1), "update_interval": np.int64(5)}
    assert json.dumps(TrainConfig(granet=numbers).to_dict())  # plain JSON, no NumPy types
    assert TrainConfig(granet={"final_density": 0.05}).granet.final_density == 0.05
    assert TrainConfig(granet={}).granet == TrainConfig().granet


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GraNetConfig(prune_end=math.inf), "prune_end=inf is invalid"),
        (lambda: GraNetConfig(regrow_end=math.inf), "regrow_end=inf is invalid"),
        (lambda: GraNetConfig(dense_first="no"), "dense_first='no' is invalid"),
        (lambda: TrainConfig(weight_decay=math.inf), "weight_decay=inf is invalid"),
        (lambda: TrainConfig(lr_milestones=6), "lr_milestones=6 is invalid"),
        (lambda: TrainConfig(granet={"final_densty": 0.1}), "unknown granet field(s)"),
        (lambda: TrainConfig(granet=3), "granet=3 is invalid"),
        (lambda: RunSettings(cpus_per_worker=math.inf), "cpus_per_worker=inf is invalid"),
        (lambda: RunSettings(gpus_per_worker=math.inf), "gpus_per_worker=inf is invalid"),
        (lambda: RunSettings(name="nl\n"), "name='nl\\n' is invalid"),
        (lambda: TrainConfig(seed=-5), "seed=-5 is invalid"),
        (lambda: GraNetConfig(seed=2**64), "seed=18446744073709551616 is invalid"),
    ],
)
def test_meaningless_values_are_config_errors(build, message: str) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError) as info:
        build()
    assert message in str(info.value)


def test_preset_files_are_changes_of_the_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    assert load_preset_file(empty) == TrainConfig()
    dotted = tmp_path / "dotted.yaml"
    dotted.write_text("granet.final_density: 0.05\nlr_milestones: [2, 4]\n")
    train = load_preset_file(dotted)
    assert train.granet.final_density == 0.05 and train.lr_milestones == (2, 4)
    bad = tmp_path / "bad.json"
    bad.write_text('{"lr_milestones": 6}')
    with pytest.raises(ConfigError, match="bad.json: lr_milestones=6 is invalid"):
        load_preset_file(bad)


def test_preset_and_preset_file_together_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "p.json"
    file.write_text("{}")
    assert main(["train", "--preset", "mnist_demo", "--preset-file", str(file)]) == 2
    assert "give one of them" in capsys.readouterr().err


# ---- 7, 8, 10, 12: the command line ------------------------------------------------------------


def _options() -> set[str]:
    """Every option of every ``granet-ray`` command."""
    found: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            found.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    return found


def test_every_flag_a_message_or_docstring_names_exists() -> None:
    """A hint must work as written: every ``--flag`` in the package's strings is one of the
    command line's options (``--working-dir`` is Ray's own ``ray job submit`` flag)."""
    options = _options() | {"--working-dir"}
    named: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for word in node.value.replace("`", " ").split():
                    flag = word.strip(".,;:()[]'\"").split("=")[0]
                    if flag.startswith("--") and len(flag) > 2 and flag[2].isalpha():
                        named.setdefault(flag, str(path.relative_to(ROOT)))
    unknown = {flag: where for flag, where in named.items() if flag not in options}
    assert not unknown


def test_no_progress_still_prints_the_summary_and_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--train-size", "256", "--epochs", "2", "--update-interval", "2"]
    assert main(["train", "--no-progress", *flags, "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "final sparse model" in out and "validation accuracy" in out
    assert str(tmp_path) in out and "checkpoint_epoch_0002" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", "-5"], "seed=-5 is invalid: must be an integer in [0, 2**63)"),
        (["--seed", str(2**64)], "seed=18446744073709551616 is invalid"),
        (["--device", "bogus"], "device='bogus' is invalid"),
        (["--name", "nl\n"], "name='nl\\n' is invalid"),
        (["--set", "granet.final_density=2"], "final_density=2.0 is invalid"),
        (["--set", "nope=1"], "unknown train config field(s) nope"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["train", *flags, "--storage", str(tmp_path)])
    except SystemExit as exited:  # argparse: a malformed value
        code = int(exited.code or 0)
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_cuda_device_without_a_gpu_is_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert main(["train", "--device", "cuda", "--storage", str(tmp_path)]) == 2
    assert "device='cuda' is invalid: this machine has no such CUDA device" in (
        capsys.readouterr().err
    )


# ---- 10, 12: hints that fit the case, layers left empty ---------------------------------------


def test_the_window_hint_suggests_a_shorter_interval_only_where_one_helps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--global-batch", "100000", "--train-size", "512", "--epochs", "1"]
    assert main(["train", *flags, "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "hold no mask update at update_interval=1" in err
    assert "--update-interval" not in err.split(":", 2)[-1] and "widen the window" in err
    flags = ["--epochs", "2", "--update-interval", "50", "--train-size", "512"]
    assert main(["train", *flags, "--storage", str(tmp_path)]) == 2
    assert "pass --update-interval 2 or smaller" in capsys.readouterr().err


def test_a_layer_pruned_to_no_active_weight_is_named_in_a_warning() -> None:
    import torch

    from granet_ray.sparsity import GraNet

    model = torch.nn.Sequential(torch.nn.Linear(400, 400), torch.nn.Linear(400, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = GraNetConfig(
        method="gmp", final_density=0.001, update_interval=1, prune_start=0, prune_end=1
    )
    engine = GraNet(model, optimizer, config, total_steps=2, steps_per_epoch=1)
    with torch.no_grad():
        model[1].weight.mul_(1e-6)  # the small last layer loses every weight to the global cut
    torch.nn.functional.mse_loss(model(torch.randn(4, 400)), torch.zeros(4, 2)).backward()
    optimizer.step()
    with pytest.warns(UserWarning, match=r"1 layer\(s\) without an active weight \(1.weight\)"):
        engine.step()
    assert engine.active_counts()["1.weight"] == 0
