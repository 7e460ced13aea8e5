"""cluster.yaml is a Ray autoscaler config for GPU workers on AWS that ``ray up`` accepts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_matches_rays_autoscaler_schema(cluster: dict[str, Any]) -> None:
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))


def test_passes_rays_own_validation_after_defaults(cluster: dict[str, Any]) -> None:
    """What ``ray up`` does first: fill in the AWS defaults, then validate."""
    assert validate_config(prepare_config(cluster)) is None


def test_has_the_keys_the_autoscaler_requires(cluster: dict[str, Any]) -> None:
    assert cluster["cluster_name"]
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    assert cluster["auth"]["ssh_user"]
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    for node_type in types.values():
        assert {"node_config", "resources"} <= set(node_type)
        assert node_type["node_config"]["InstanceType"]
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"]}
    assert workers
    for worker in workers.values():
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= cluster["max_workers"]
    assert any(w["resources"].get("GPU", 0) > 0 for w in workers.values())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("ray start" in command for command in cluster[key])


def test_installs_this_package_and_gives_workers_s3_access(cluster: dict[str, Any]) -> None:
    assert cluster["file_mounts"] == {"~/granet-ray": "."}
    assert ".venv" in cluster["rsync_exclude"]
    assert any("pip install -e ~/granet-ray" in c for c in cluster["setup_commands"])
    types = cluster["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert all("IamInstanceProfile" in t["node_config"] for t in gpu)


def test_its_example_command_names_an_existing_job(cluster: dict[str, Any]) -> None:
    text = (ROOT / "cluster.yaml").read_text()
    assert "ray job submit --working-dir ." in text
    assert "python jobs/imagenet_resnet50.py" in text
    assert (ROOT / "jobs" / "imagenet_resnet50.py").exists()
