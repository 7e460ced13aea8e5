"""The shared Ray session for tests: one local Ray instance for the whole test run.

Settings from ../shared/environment.md: auth and usage stats off, ``address="local"`` (never
attach to a stale cluster), 2 CPUs, a 256 MiB object store, the dashboard on (Tune needs it
to reclaim the CPUs of trials stopped early). The dashboard listens on a free loopback port
and the instance's processes are told so (``RAY_API_SERVER_ADDRESS`` in the job's runtime
env): Ray Train's placement-group cleaner finds its state API even while other Ray instances
run on the machine (otherwise it cannot tell which one is its own and never frees the CPUs).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Start local Ray once (first test that asks) and shut it down at the end of the run."""
    import ray

    os.environ.update(RAY_ENV)
    if not ray.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(
            address="local",
            num_cpus=2,
            object_store_memory=256 * 2**20,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
            log_to_driver=False,
        )
    yield
    ray.shutdown()


__all__ = ["RAY_ENV", "ray_session"]
