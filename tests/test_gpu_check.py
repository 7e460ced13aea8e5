"""``benchmarks/gpu_check.py`` on the CPU: it starts from a bare checkout (the package not
installed, Ray, s3fs and mlxtend unimportable) and runs every phase of its ``--smoke`` path in
subprocesses, writing its JSON; without CUDA it exits 0 at once; its figures, goals and
warnings from given measurements; a phase that outlives its limit is killed and reported."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "benchmarks" / "gpu_check.py"

# A sitecustomize for every Python the check starts: Ray, s3fs and mlxtend refuse to import,
# and the editable install of granet_ray is gone, as on a bare machine.
_BARE = """
import importlib.abc
import sys


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in {"ray", "s3fs", "mlxtend"}:
            raise ImportError(f"gpu_check must not import {name}")


sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.meta_path.insert(0, Refuse())
"""


@pytest.fixture
def bare(tmp_path: Path) -> dict[str, str]:
    """The environment of a bare machine (see ``_BARE``), for processes run in ``tmp_path``."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BARE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(site), "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def gpu_check() -> Iterator[ModuleType]:
    """``benchmarks/gpu_check.py`` imported as the module ``gpu_check``."""
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["gpu_check"]


def test_a_bare_machine_cannot_import_the_package(bare: dict[str, str], tmp_path: Path) -> None:
    """The premise of the next tests: without the check's own path, no granet_ray, no Ray."""
    for module in ("granet_ray", "ray", "mlxtend", "s3fs"):
        done = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            cwd=tmp_path,
            env=bare,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0 and "Error" in done.stderr, module


def test_without_cuda_it_says_so_and_exits_0(bare: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(CHECK), "--json", str(out)],
        cwd=tmp_path,
        env=bare,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    assert json.loads(out.read_text())["cuda"] is False


def test_the_smoke_path_runs_every_phase_from_a_bare_checkout(
    bare: dict[str, str], tmp_path: Path
) -> None:
    """``--smoke``: the GPU tests (skipped without CUDA), the compile phase (Dynamo without a
    compiler) with no graph break, the benchmark (dense, GraNet, dense, the loader apart) and
    the production phase (DDP over gloo with and without the sparse all-reduce hook), each in
    its own subprocess, with the figures in the JSON."""
    out = tmp_path / "figures" / "check.json"
    done = subprocess.run(
        [sys.executable, str(CHECK), "--smoke", "--json", str(out)],
        cwd=tmp_path,
        env=bare,
        capture_output=True,
        text=True,
        timeout=570,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads(out.read_text())
    assert record["smoke"] and not record["cuda"]
    phases = record["phases"]
    assert list(phases) == ["tests", "compile", "benchmark", "production"]
    for name, phase in phases.items():
        assert phase["returncode"] == 0 and not phase["timed_out"], (name, phase)
        assert "error" not in phase, phase.get("error")
    assert " skipped" in phases["tests"]["summary"]
    compiled = phases["compile"]
    assert compiled["graph_breaks"] == 0 and compiled["updates"] == [2, 4]
    assert compiled["inference_flops"] is not None  # measured eagerly before compiling
    bench = phases["benchmark"]
    assert [r["name"] for r in bench["runs"]] == ["dense", "granet", "dense"]
    dense, masked = bench["runs"][:2]
    timed = [str(s) for s in range(3, 9)]  # 2 warm-up steps, then 6 timed
    assert list(dense["step_seconds"]) == list(masked["step_seconds"]) == timed
    assert dense["updates"] == [] and dense["density"] == 1.0 and dense["peak_bytes"] is None
    assert masked["updates"] == [2, 4, 6, 8] and list(masked["engine_seconds"]) == ["4", "6", "8"]
    assert bench["figures"]["timed_updates"] == [4, 6, 8]
    assert bench["figures"]["loader_images_per_second"] > 0
    assert bench["figures"]["loader_fed_dense_steps"] == 2 + 3  # warm-up + its own steps
    assert bench["figures"]["granet_final_density"] == pytest.approx(0.2, abs=1e-5)
    production = phases["production"]["figures"]
    assert 0 < production["bytes_ratio"] < 1
    for variant in ("plain_allreduce", "sparse_allreduce"):
        assert production[variant]["updates"] == [3, 6]
    assert set(record["met"]) == {
        "throughput_ratio",
        "update_per_step",
        "memory_ratio",
        "graph_breaks",
        "steady_step_host_syncs",
    }
    assert not list(out.parent.glob(".gpu_check.*"))  # the phases' own files are gone


def _measurement(g: ModuleType, name: str, seconds: float, **changes: object) -> object:
    fields = {
        "name": name,
        "batch": 10,
        "steps": 6,
        "step_seconds": dict.fromkeys(range(3, 7), seconds),
        "engine_seconds": {},
        "updates": [],
        "peak_bytes": 1000,
        "loss": 1.0,
        "density": 1.0,
        **changes,
    }
    return g.Measurement(**fields)


def test_figures_goals_and_warnings_from_measurements(gpu_check: ModuleType) -> None:
    """Images/s over the steps without an update, the dense drift flagged over 1%, the update
    per step, memory; goals met or missed; a loader slower than 1.3x the GPU warned about."""
    g = gpu_check
    first = _measurement(g, "dense", 0.1)
    second = _measurement(g, "dense", 0.1 * 1.02)
    masked = _measurement(
        g,
        "granet",
        0.1,
        step_seconds={3: 0.1, 4: 0.5, 5: 0.1, 6: 0.5},
        engine_seconds={4: 0.15, 6: 0.25},
        updates=[2, 4, 6],
        peak_bytes=1010,
        density=0.2,
    )
    figures = g.compare([first, second], masked)
    assert figures["granet_images_per_second"] == pytest.approx(100.0)
    assert figures["dense_images_per_second_runs"] == pytest.approx([100.0, 100 / 1.02])
    assert figures["dense_drift_flagged"] and figures["dense_drift"] == pytest.approx(0.0198, 0.01)
    assert figures["update_per_step"] == pytest.approx(2.0)
    assert figures["memory_ratio"] == pytest.approx(1.01)
    figures.update(loader_images_per_second=120.0, loader_too_slow=True)
    phases = {
        "compile": {"graph_breaks": 1},
        "benchmark": {"figures": figures},
        "production": {"figures": {"steady_step_host_syncs": 0}},
    }
    met = g.goals_met(phases)
    assert met == {
        "throughput_ratio": True,
        "update_per_step": True,
        "memory_ratio": True,
        "graph_breaks": False,
        "steady_step_host_syncs": True,
    }
    notes = g.notes(phases)
    assert len(notes) == 2 and "1%" in notes[0] and "1.3x" in notes[1]
    assert not g.goals_met({})["throughput_ratio"]  # a missing figure is not met


def test_a_phase_past_its_limit_is_killed_and_reported(gpu_check: ModuleType) -> None:
    result = gpu_check.run_subprocess(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
        dict(os.environ),
        timeout=3,
    )
    assert result["timed_out"] and result["returncode"] != 0
    assert result["summary"] == "timed out after 3 s"


def test_out_of_time_is_not_an_exception(gpu_check: ModuleType) -> None:
    """No library's ``except Exception`` can swallow the time limit."""
    assert not issubclass(gpu_check.OutOfTime, Exception)
    assert issubclass(gpu_check.OutOfTime, BaseException)
