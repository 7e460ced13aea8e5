"""The job scripts: bad flags fail before Ray is contacted, with one line naming the field;
and a real ``ray job submit`` of the demo against a local head leaves a checkpoint that
``load_sparse`` opens."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import ray
from fixtures_ray import RAY_ENV
from fixtures_s3 import S3_TEST_BUCKET

from granet_ray.store import load_sparse
from granet_ray.testing.ports import free_port, free_ports
from granet_ray.testing.seaweedfs import SeaweedFS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _job(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A job script as a module; starting or contacting Ray fails the test."""
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def init(*args: object, **kwargs: object) -> None:
        raise AssertionError("the job started Ray despite an invalid configuration")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return module


@pytest.mark.parametrize(
    ("job", "flags", "message"),
    [
        ("mnist_demo", ["--final-density", "1.5"], "final_density=1.5 is invalid"),
        ("mnist_demo", ["--init-density", "0.05"], "final_density=0.1 is invalid"),
        ("mnist_demo", ["--epochs", "0"], "epochs=0 is invalid"),
        ("mnist_demo", ["--num-workers", "0"], "num_workers=0 is invalid"),
        ("mnist_demo", ["--gpus-per-worker", "-1"], "gpus_per_worker=-1.0 is invalid"),
        ("mnist_demo", ["--storage", "ftp://host/x"], "storage_path='ftp://host/x' is invalid"),
        ("mnist_demo", ["--checkpoint-every", "0"], "checkpoint_every=0 is invalid"),
        ("mnist_demo", ["--train-size", "99999"], "train_size=99999"),
        ("mnist_demo", ["--update-interval", "5000"], "hold no mask update"),
        ("mnist_demo", ["--global-batch", "0"], "global_batch=0 is invalid"),
        ("mnist_demo", ["--global-batch", "1"], "global_batch=1 is invalid"),  # 2 workers
        ("mnist_demo", ["--storage", "/proc/granet-x"], "cannot"),
        (
            "mnist_demo",
            ["--storage", "s3://bucket/x", "--s3-endpoint", "http://127.0.0.1:1"],
            "at http://127.0.0.1:1",  # no credentials in the environment here
        ),
        ("mnist_demo", ["--preset-file", "/nonexistent/best.json"], "cannot be read"),
        ("cifar10_resnet20", ["--data-root", "/nonexistent"], "/nonexistent"),
        ("imagenet_resnet50", ["--synthetic", "--lr", "-1"], "lr=-1.0 is invalid"),
        ("imagenet_resnet50", ["--synthetic", "--name", "a/b"], "name='a/b' is invalid"),
        ("imagenet_resnet50", [], "data_root=None is invalid"),
        ("cifar10_resnet20", [], "data_root=None is invalid"),
        ("tune_schedules", ["--final-density", "1.5"], "final_density=1.5 is invalid"),
    ],
)
def test_invalid_flags_fail_before_ray_naming_the_field(
    job: str,
    flags: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _job(job, monkeypatch).main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("job", "flags", "message"),
    [
        ("mnist_demo", ["--method", "magic"], "invalid choice: 'magic'"),
        (
            "mnist_demo",
            ["--epochs", "two"],
            "argument --epochs: epochs='two' is invalid: must be a value of type int",
        ),
    ],
)
def test_missing_or_malformed_flags_are_usage_errors(
    job: str,
    flags: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _job(job, monkeypatch).main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unreachable_s3_endpoint_fails_before_ray_within_seconds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    endpoint = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    flags = ["--storage", "s3://bucket/x", "--s3-endpoint", endpoint]
    assert _job("imagenet_resnet50", monkeypatch).main(["--synthetic", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach S3 endpoint") and endpoint in err
    assert time.monotonic() - start < 15


def test_wrong_s3_secret_fails_before_ray_naming_the_endpoint(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    flags = ["--storage", f"s3://{S3_TEST_BUCKET}/jobs", "--s3-endpoint", seaweedfs.endpoint_url]
    assert _job("mnist_demo", monkeypatch).main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and seaweedfs.endpoint_url in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_invalid_flag_from_the_command_line_prints_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "jobs/mnist_demo.py", "--final-density", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: final_density=2.0 is invalid: must be a number in (0, 1]"
    ]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """A local Ray head (``ray start --head --block``) on free ports with its own temp dir;
    yields the environment for ``ray job submit``. Stopped by its PID (SIGTERM, which tears
    down its own processes; then its process group), never by ``ray stop``, which would end
    every Ray on the machine, including the test session's."""
    names = (
        "port",
        "dashboard-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "ray-client-server-port",
        "metrics-export-port",
        "node-manager-port",
        "object-manager-port",
    )
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    temp_dir = tempfile.mkdtemp(prefix="grh-", dir="/tmp")  # short: unix socket paths
    env = {
        **os.environ,
        **RAY_ENV,
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this one
    }
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--object-store-memory=268435456",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115 (closed below)
    head = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()
                assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
                time.sleep(1)
        yield {**env, "RAY_API_SERVER_ADDRESS": address}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        with contextlib.suppress(ProcessLookupError):  # whatever the head left behind
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(env: dict[str, str], job: str, flags: list[str]) -> subprocess.CompletedProcess:
    """``ray job submit`` of ``jobs/<job>.py`` with ``flags`` to the head of ``env``."""
    command = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python"]
    command += [f"jobs/{job}.py", *flags]
    for _ in range(5):  # the job server answers before the head's job agent is up
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480
        )
        if "No available agent to submit job" not in result.stderr:
            break
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout
    return result


def test_ray_job_submit_trains_and_leaves_a_loadable_checkpoint(
    ray_head: dict[str, str], tmp_path: Path
) -> None:
    flags = ["--epochs", "1", "--train-size", "256", "--global-batch", "32"]
    flags += ["--update-interval", "2", "--storage", str(tmp_path), "--name", "submitted"]
    result = _submit(ray_head, "mnist_demo", flags)
    assert "test accuracy of the sparse model" in result.stdout
    assert "training on 2 worker(s)" in result.stdout
    checkpoint = load_sparse(tmp_path / "submitted" / "checkpoint_epoch_0001")
    assert checkpoint.metadata["epoch"] == 1 and checkpoint.metadata["world_size"] == 2
    active = sum(int(m.sum()) for m in checkpoint.masks.values())
    assert active / sum(m.numel() for m in checkpoint.masks.values()) == pytest.approx(0.1, 1e-4)


def test_ray_job_submit_of_the_imagenet_job_elastic_between_1_and_2_workers(
    ray_head: dict[str, str], tmp_path: Path
) -> None:
    """The ImageNet job (ResNet-50, synthetic images) with --num-workers 1:2:
    Ray Train V2 gets (1, 2); the head's 2 CPUs hold both, so it trains on 2."""
    flags = ["--synthetic", "--epochs", "2", "--train-size", "32", "--global-batch", "16"]
    flags += ["--update-interval", "1", "--num-workers", "1:2"]
    flags += ["--storage", str(tmp_path), "--name", "imagenet"]
    result = _submit(ray_head, "imagenet_resnet50", flags)
    assert "training on 2 worker(s): 2 epochs of 2 steps of 16 samples" in result.stdout
    checkpoint = load_sparse(tmp_path / "imagenet" / "checkpoint_epoch_0002", map_location="cpu")
    meta = checkpoint.metadata
    assert (meta["epoch"], meta["step"], meta["world_size"]) == (2, 4, 2)
    assert meta["train"]["dataset"] == "synthetic_imagenet" and meta["train"]["model"] == "resnet50"
    active = sum(int(m.sum()) for m in checkpoint.masks.values())
    assert active / sum(m.numel() for m in checkpoint.masks.values()) == pytest.approx(0.2, 1e-4)
