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


def test_gpu_workers_are_spot_instances_between_a_min_and_a_max(cluster: dict[str, Any]) -> None:
    types = cluster["available_node_types"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(
        t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in gpu
    )
    assert all(1 <= t["min_workers"] < t["max_workers"] for t in gpu)
    head = types[cluster["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]  # the driver never goes away


def test_its_example_command_is_a_valid_elastic_job(cluster: dict[str, Any]) -> None:
    text = (ROOT / "cluster.yaml").read_text()
    assert "ray job submit --working-dir ." in text
    assert "python jobs/imagenet_resnet50.py" in text
    assert (ROOT / "jobs" / "imagenet_resnet50.py").exists()
    lines = text.split("ray job submit --working-dir . -- \\\n")[1].split("ray down")[0]
    flags = " ".join(line.strip("# \\\n") for line in lines.splitlines()).split()[2:]
    from granet_ray.cli import build_parser, recipe, run_settings

    args = build_parser().parse_args(["fit", "--preset", "imagenet_resnet50", *flags])
    run = run_settings(args)
    assert run.elastic and (run.min_workers, run.num_workers) == (4, 16)
    gpu = [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU", 0)]
    per_node = gpu[0]["resources"]["GPU"]
    assert run.min_workers <= gpu[0]["min_workers"] * per_node
    assert run.num_workers <= gpu[0]["max_workers"] * per_node
    train, _ = recipe(args)
    assert train.global_batch == 128 and train.data_root == "s3://YOUR-BUCKET/imagenet-packed"
    assert run.data_cache_gb == 64 and run.data_options is None  # the instance profile
    assert "granet-ray data pack /mnt/imagenet s3://YOUR-BUCKET/imagenet-packed" in text
