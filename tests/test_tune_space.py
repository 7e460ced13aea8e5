"""Sweep spaces without Ray: grid files and flags become validated trials in a fixed order
with stable names; every invalid space fails before any trial starts, naming the field."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import ray
import yaml

from granet_ray.cli import build_parser, grid_overrides
from granet_ray.config import ConfigError, RunSettings, preset
from granet_ray.tune.space import (
    TRIAL_DRIVER_CPU,
    expand,
    load_space,
    max_concurrent_trials,
    settle_asha,
    sweep_name,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
RUN = RunSettings(num_workers=1, cpus_per_worker=0.99, storage_path="/tmp/unused")
SMALL = {
    "base": "mnist_demo",
    "train": {"epochs": 2, "train_size": 256, "global_batch": 32},
    "variants": {"granet-s2s": {"method": "granet", "init_density": 0.5}},
    "grid": {"final_density": [0.1], "update_interval": [2], "prune_window": [[0, 1]]},
    "seeds": [0],
}


def _with(**changes: object) -> dict:
    """SMALL with top-level keys replaced; ``grid`` and ``train`` entries are merged into
    SMALL's."""
    data = {**SMALL, **changes}
    for key in ("grid", "train"):
        if key in changes:
            data[key] = {**SMALL[key], **changes[key]}  # type: ignore[dict-item]
    return data


def test_packaged_grids_expand_in_order_with_stable_names() -> None:
    smoke = expand(load_space("smoke"))
    assert [p.name for p in smoke] == [
        "granet-d2s_df0.1_dt4_w0-1.5_s0",
        "rigl_df0.1_dt4_w0-1.5_s0",
        "granet-d2s_df0.005_dt4_w0-1.5_s0",
        "rigl_df0.005_dt4_w0-1.5_s0",
    ]
    paper = load_space("paper")
    assert paper.asha is not None and len(expand(paper)) == 2 * 3 * 2
    compare = load_space("compare")
    points = expand(compare)
    assert compare.asha is None and len(points) == 5 * 3 * 3
    assert {p.variant for p in points} == {"granet-d2s", "granet-s2s", "gmp", "rigl", "set"}
    for p in points:
        g = p.train.granet
        assert p.train.seed == g.seed == p.seed and p.name == f"{p.group}_s{p.seed}"
        assert (p.train.epochs, p.train.train_size, g.update_interval) == (3, 2000, 10)
        assert (p.train.global_batch, p.train.lr) == (32, 0.05)
        assert (g.prune_start, g.prune_end) == (0, 1.5)
        # each method's own regrowth: p0 = 0.5 for GraNet, the RigL paper's 0.3 for RigL/SET
        expected_fraction = {"rigl": 0.3, "set": 0.3, "gmp": 0.0}.get(p.variant, 0.5)
        assert g.initial_fraction == expected_fraction
        expected_start = {"granet-d2s": 1.0, "granet-s2s": 0.5, "gmp": 1.0}
        assert g.start_density == expected_start.get(p.variant, g.final_density)
    # Same budget for every method: only the GraNet fields differ between trials.
    recipes = {
        json.dumps({k: v for k, v in p.train.to_dict().items() if k not in ("granet", "seed")})
        for p in points
    }
    assert len(recipes) == 1


def test_base_epochs_scale_the_schedule_and_fixed_fields_apply() -> None:
    space = load_space(
        _with(
            train={"epochs": 4, "lr": 0.02, "granet": {"allocation": "uniform"}},
            base="mnist_demo",
        )
    )
    assert space.base.epochs == 4 and space.base.lr_milestones == (3,)  # 6 of 8 epochs
    (point,) = expand(space)
    assert point.train.lr == 0.02 and point.train.granet.allocation == "uniform"
    assert (point.train.granet.prune_start, point.train.granet.prune_end) == (0, 1)


def test_overrides_merge_grid_train_and_asha_and_replace_the_rest() -> None:
    space = load_space(
        "smoke",
        {"grid": {"final_density": [0.2]}, "seeds": [1, 2], "asha": {"grace_period": 2}},
    )
    grid = space.grid
    assert grid["granet.final_density"] == [0.2] and grid["granet.update_interval"] == [4]
    assert space.seeds == (1, 2)
    assert space.asha is not None and (space.asha.grace_period, space.asha.reduction_factor) == (
        2,
        2.0,
    )
    assert space.base.train_size == 512


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(grid={"final_density": [1.5]}), "final_density=1.5 is invalid"),
        (_with(grid={"final_density": [0]}), "final_density=0 is invalid"),
        (_with(grid={"final_density": [0.6]}), "final_density=0.6 is invalid: must be <= init"),
        (_with(grid={"update_interval": [0]}), "update_interval=0 is invalid"),
        (_with(grid={"update_interval": [2.5]}), "update_interval=2.5 is invalid"),
        (_with(grid={"prune_window": [[1, 1]]}), "prune_end=1 is invalid"),
        (_with(grid={"prune_window": [[0, 3]]}), "granet.prune_end=3 is invalid"),
        (_with(grid={"prune_window": [[0]]}), "grid.prune_window=[0] is invalid"),
        (_with(grid={"regrow_fraction": [1.5]}), "regrow_fraction=1.5 is invalid"),
        (_with(grid={"update_interval": [500]}), "update_interval"),  # no update in training
        (_with(variants={"x": {"method": "magic"}}), "method='magic' is invalid"),
        (_with(variants={"x": {"methd": "gmp"}}), "unknown variants.x field(s) methd"),
        (_with(variants={"a/b": {"method": "gmp"}}), "variants='a/b' is invalid"),
        (_with(grid={"init_density": [0.5]}), "variants.granet-s2s and grid both set"),
        (_with(grid={"lr_x": [0.1]}), "unknown grid field(s) lr_x"),
        (_with(grid={"epochs": [2]}), "grid.epochs=[2] is invalid"),
        (_with(variants={"x": {"seed": 1}}), "variants.x.seed=1 is invalid"),
        (_with(grid={"final_density": [0.1, 0.10000000001]}), "0.1 and 0.10000000001 both"),
        (_with(grid={"final_density": []}), "grid.final_density=[] is invalid"),
        (_with(grid={"final_density": [0.1, 0.1]}), "without duplicates"),
        (_with(grid={"final_density": 0.1}), "grid.final_density=0.1 is invalid"),
        (_with(seeds=[]), "seeds=[] is invalid"),
        (_with(seeds=[0, 0]), "seeds=[0, 0] is invalid"),
        (_with(asha={"reduction_factor": 1}), "asha.reduction_factor=1 is invalid"),
        (_with(asha={"grace_period": 2}), "asha.grace_period=2 is invalid"),  # = epochs
        (_with(asha={"grace": 1}), "unknown asha field(s) grace"),
        (_with(base="nope"), "base='nope' is invalid"),
        (_with(train={"epochs": 0}), "epochs=0 is invalid"),
        (_with(train={"seed": 3}), "train.seed=3 is invalid"),
        (_with(train={"global_batch": 0}), "global_batch=0 is invalid"),
        (_with(train={"batch_size": 32}), "unknown train field(s) batch_size"),
        (_with(train={"train_size": 99999}), "train_size=99999"),
        (_with(train={"optimiser": "sgd"}), "unknown train field(s) optimiser"),
        (_with(name="a b"), "name='a b' is invalid"),
        ({**SMALL, "sweeps": 1}, "unknown grid key(s) sweeps"),
        ({k: v for k, v in SMALL.items() if k != "variants"}, "needs variants or grid.method"),
    ],
)
def test_invalid_spaces_fail_before_any_trial_naming_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(load_space(data), RUN)
    assert message in str(info.value)


def test_an_invalid_combination_names_the_trial() -> None:
    data = _with(
        variants={"s2s": {"method": "granet", "init_density": 0.5}, "rigl": {"method": "rigl"}},
        grid={"final_density": [0.1, 0.7]},
    )
    with pytest.raises(ConfigError, match=r"^trial s2s_df0.7_dt2_w0-1_s0: final_density=0.7"):
        expand(load_space(data))


def test_grid_files_are_read_with_relative_preset_bases(tmp_path: Path) -> None:
    best = preset("mnist_demo").replace(train_size=128, global_batch=16)
    (tmp_path / "best.json").write_text(json.dumps(best.to_dict()))
    grid = {k: v for k, v in SMALL.items() if k not in ("base", "train")}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**grid, "base": "best.json"}))
    space = load_space(tmp_path / "mine.yaml")
    assert space.label == "mine" and space.base.train_size == 128
    with pytest.raises(ConfigError, match="grid='nope' is invalid"):
        load_space("nope")
    (tmp_path / "bad.yaml").write_text("grid: [")
    with pytest.raises(ConfigError, match="not valid YAML/JSON"):
        load_space(tmp_path / "bad.yaml")


def test_sweep_names_follow_the_space() -> None:
    space = load_space("smoke")
    points = expand(space)
    name = sweep_name(space, points, RUN)
    assert name.startswith("sweep-smoke-") and name == sweep_name(space, expand(space), RUN)
    other = load_space("smoke", {"seeds": [1]})
    assert sweep_name(other, expand(other), RUN) != name
    assert sweep_name(space, points, RUN.replace(num_workers=2)) != name
    no_asha = load_space("smoke", {"asha": None})
    assert sweep_name(no_asha, expand(no_asha), RUN) != name


def test_concurrent_trials_follow_the_cluster_and_the_workers_per_trial() -> None:
    assert max_concurrent_trials({"CPU": 2.0}, RUN) == 2
    assert max_concurrent_trials({"CPU": 2.0}, RUN.replace(cpus_per_worker=0.65)) == 3
    assert max_concurrent_trials({"CPU": 16.0}, RUN.replace(num_workers=4, cpus_per_worker=1)) == 3
    gpu = RUN.replace(num_workers=2, cpus_per_worker=2, gpus_per_worker=1)
    assert max_concurrent_trials({"CPU": 64.0, "GPU": 4.0}, gpu) == 2
    with pytest.raises(ConfigError, match=r"num_workers=2 is invalid: one trial needs 2\.01 CPU"):
        max_concurrent_trials({"CPU": 2.0}, RUN.replace(num_workers=2, cpus_per_worker=1))
    with pytest.raises(ConfigError, match="GPU"):
        max_concurrent_trials({"CPU": 8.0}, gpu)
    assert TRIAL_DRIVER_CPU > 0  # Tune refuses a trial without resources


def _job(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """jobs/tune_schedules.py as a module; starting Ray fails the test."""
    spec = importlib.util.spec_from_file_location("job_tune", ROOT / "jobs" / "tune_schedules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def init(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sweep job started Ray")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return module


def test_asha_waits_for_the_end_of_the_pruning_windows() -> None:
    """Spec-v2 issue, point 9: before every trial's pruning window ends trials sit at
    different densities, so ASHA's first rung comes after it (or ASHA is turned off)."""
    space = load_space("smoke", {"asha": {"grace_period": 1}})
    settled, note = settle_asha(space, expand(space))
    assert settled.asha is not None and settled.asha.grace_period == 2
    assert note == "ASHA grace_period 1 -> 2 epochs: pruning windows end at epoch 1.5"
    late = load_space("smoke", {"grid": {"prune_window": [[0, 2.5]]}})
    settled, note = settle_asha(late, expand(late))
    assert settled.asha is None and note is not None and "ASHA early stopping is off" in note
    fine = load_space("smoke")
    assert settle_asha(fine, expand(fine)) == (fine, None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--final-density", "1.5"], "final_density=1.5 is invalid"),
        (["--update-interval", "0"], "update_interval=0 is invalid"),
        (["--prune-window", "1:0.5"], "prune_end=0.5 is invalid"),
        (["--grid", "nope"], "grid='nope' is invalid"),
        (["--seeds", "-1"], "seeds=[-1] is invalid"),
        (["--num-workers", "0"], "num_workers=0 is invalid"),
        (["--grace-period", "3"], "asha.grace_period=3 is invalid"),
        (["--synthetic"], "synthetic=True is invalid for a sweep"),
        (["--storage", "ftp://x/y"], "storage_path='ftp://x/y' is invalid"),
    ],
)
def test_invalid_flags_fail_before_ray_naming_the_field(
    flags: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _job(monkeypatch).main(["--grid", "smoke", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_malformed_flags_are_usage_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _job(monkeypatch).main(["--prune-window", "0-2"])
    assert info.value.code == 2
    assert "is not START:END" in capsys.readouterr().err


def test_flags_replace_the_grid_and_a_dry_run_lists_the_trials(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--grid", "smoke", "--method", "gmp", "set", "--final-density", "0.2", "0.1"]
    flags += ["--prune-window", "0:1", "--seeds", "3", "--epochs", "2", "--no-asha"]
    space = load_space("smoke", grid_overrides(build_parser().parse_args(["sweep", *flags])))
    assert list(space.variants) == ["gmp", "set"] and space.asha is None
    grid = space.grid
    assert grid["granet.final_density"] == [0.2, 0.1] and grid["granet.prune_window"] == [[0, 1]]
    assert space.seeds == (3,) and space.base.epochs == 2
    monkeypatch.setenv("COLUMNS", "160")
    assert _job(monkeypatch).main([*flags, "--dry-run"]) == 0
    shown = capsys.readouterr().out
    assert "4 trials (dry run)" in shown and "sweep-smoke-" in shown
    assert "gmp_df0.2_dt4_w0-1_s3" in shown and "set_df0.1_dt4_w0-1_s3" in shown
