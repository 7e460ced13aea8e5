"""Shared pytest fixtures (each lives in its own module, imported here) and the automatic
markers: a test that uses a fixture of ``FIXTURE_MARKS``, directly or through other fixtures,
gets that fixture's marker, so ``-m "not ray and not s3"`` leaves out every test that starts
Ray or the SeaweedFS server without anyone having to remember to mark it."""

from __future__ import annotations

import pytest
from fixtures_ray import *  # noqa: F403
from fixtures_s3 import *  # noqa: F403
from tiny import one_thread  # noqa: F401

# fixture -> marker (pyproject.toml lists the markers). ``ray_head`` (test_jobs.py) starts a
# Ray head with ``ray start``; a test that starts Ray in a subprocess of its own marks itself.
FIXTURE_MARKS = {"ray_session": "ray", "ray_head": "ray", "seaweedfs": "s3"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by the fixtures it uses (before ``-m`` selects)."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for fixture, marker in FIXTURE_MARKS.items():
            if fixture in used:
                item.add_marker(marker)
