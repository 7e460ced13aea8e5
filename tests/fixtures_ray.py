"""The shared Ray session for tests: one private local Ray instance for the whole test run,
started by the package's own ``granet_ray.train.connect``.

Settings that work on a shared 2-core machine: auth and usage stats off, a private instance
(``address="local"``: never attach to a stale cluster; ``$RAY_ADDRESS`` is ignored here), 2
CPUs, a 256 MiB object store, the dashboard on (Tune needs it to reclaim the CPUs of trials
stopped early) on a free loopback port that the instance's processes are told about, so
Ray Train's placement-group cleaner finds its own state API even while other Ray instances
run on the machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Start local Ray once (first test that asks) and shut it down at the end of the run;
    a test that uses it (even through another fixture) is marked ``ray`` (conftest)."""
    import ray

    from granet_ray.train import connect

    os.environ.update(RAY_ENV)
    os.environ.pop("RAY_ADDRESS", None)
    connect(dashboard=True, num_cpus=2, object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


__all__ = ["RAY_ENV", "ray_session"]
