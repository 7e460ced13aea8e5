"""Shared pytest fixtures: each lives in its own module, imported here."""

from fixtures_ray import *  # noqa: F403
from fixtures_s3 import *  # noqa: F403
from tiny import one_thread  # noqa: F401
