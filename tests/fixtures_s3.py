"""Store test fixtures: one real S3-compatible server (SeaweedFS) per session, storage roots
on local disk and on S3, and a small masked model.

``seaweedfs``: the running server (``.storage_options``, ``.endpoint_url``,
``.pyarrow_filesystem()``); ``s3_prefix``: a fresh ``s3://bucket/prefix`` per test;
``storage_root``: parametrized over local folder and S3, so a test runs against both.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from granet_ray.sparsity import initial_masks, prunable_parameters, uniform_densities
from granet_ray.testing.seaweedfs import SeaweedFS, start_seaweedfs

S3_TEST_BUCKET = "granet-tests"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS server on free loopback ports with a temp data dir, stopped by PID."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.make_bucket(S3_TEST_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_prefix(seaweedfs: SeaweedFS) -> str:
    """A unique, empty ``s3://granet-tests/<id>`` prefix on the session's server."""
    return f"s3://{S3_TEST_BUCKET}/{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class StorageRoot:
    """An empty place for checkpoints: ``base`` URI plus the storage_options it needs."""

    kind: str
    base: str
    options: dict[str, Any] | None

    def uri(self, *parts: str) -> str:
        """The URI of a child path under ``base``."""
        return "/".join([self.base, *parts])


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> StorageRoot:
    """An empty local folder, or an empty prefix on SeaweedFS (the test runs for both)."""
    if request.param == "local":
        return StorageRoot("local", str(tmp_path / "ckpts"), None)
    server: SeaweedFS = request.getfixturevalue("seaweedfs")
    return StorageRoot("s3", request.getfixturevalue("s3_prefix"), server.storage_options)


def small_net() -> nn.Module:
    """Conv (with bias) + BatchNorm + conv (no bias) + linear: every kind of tensor."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def masked_net(seed: int = 0, density: float = 0.3) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A small net with seeded masks applied, BatchNorm statistics updated once, and one
    active weight per layer set to exactly 0.0 (it must survive a round trip as active)."""
    torch.manual_seed(seed)
    model = small_net()
    params = prunable_parameters(model)
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    masks = initial_masks(shapes, uniform_densities(shapes, density), seed)
    with torch.no_grad():
        for name, p in params.items():
            p.mul_(masks[name])
            p.view(-1)[masks[name].view(-1).nonzero()[0]] = 0.0
    model(torch.randn(4, 3, 8, 8))
    return model, masks
