"""The package's boundaries: Ray only in train/ and tune/, torch.distributed only in
distributed.py, storage libraries only in store/, tune/ builds on train/ and never the
reverse, and importing the Ray-free parts loads no Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "granet_ray"
STORAGE_LIBRARIES = ("s3fs", "fsspec", "pyarrow.fs", "botocore", "boto3", "aiobotocore")


def _imports() -> list[tuple[str, str]]:
    """(file relative to the package, imported module) for every absolute import."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), relative)):
            if isinstance(node, ast.Import):
                found += [(relative, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((relative, node.module))
                found += [(relative, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _is(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_ray_only_in_train_and_tune() -> None:
    outside = [(f, m) for f, m in _imports() if _is(m, "ray")]
    assert [(f, m) for f, m in outside if not f.startswith(("train/", "tune/"))] == []


def test_torch_distributed_only_in_distributed_py() -> None:
    users = {f for f, m in _imports() if _is(m, "torch.distributed")}
    assert users == {"distributed.py"}


def test_storage_libraries_only_in_store() -> None:
    users = [(f, m) for f, m in _imports() if any(_is(m, lib) for lib in STORAGE_LIBRARIES)]
    assert [(f, m) for f, m in users if not f.startswith("store/")] == []


def test_tune_builds_on_train_never_the_reverse() -> None:
    assert [
        (f, m) for f, m in _imports() if f.startswith("train/") and _is(m, "granet_ray.tune")
    ] == []


@pytest.mark.parametrize(
    "modules",
    [
        "granet_ray, granet_ray.config, granet_ray.sparsity, granet_ray.store, "
        "granet_ray.models, granet_ray.data, granet_ray.recipe, granet_ray.resume, "
        "granet_ray.checks, granet_ray.local, granet_ray.outcome, granet_ray.ui.tables, "
        "granet_ray.cli, granet_ray.tune.space, granet_ray.tune.results, granet_ray.testing.hooks",
    ],
)
def test_the_ray_free_parts_load_no_ray(modules: str) -> None:
    code = (
        f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
