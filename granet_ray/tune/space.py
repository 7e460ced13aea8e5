"""The search space of a sweep: a grid over the GraNet schedule, from a YAML/JSON grid file and
flags, expanded into validated trial points before any trial starts. No Ray.

A grid file (all keys optional except ``variants`` or ``grid.method``); ``train``,
``variants`` and ``grid`` speak the override language of ``granet_ray.config`` (``override``:
dotted keys, short GraNet names, ``epochs`` / ``global_batch`` rescaling)::

    name: paper                 # label in the sweep's name (default: the file's stem)
    base: mnist_demo            # a preset name, or a preset file (relative to this file)
    train:                      # fixed changes of the base, e.g.
      epochs: 4                 #   scale the base's epoch schedule to this many epochs
      train_size: 4000
    variants:                   # named changes, each crossed with the grid
      granet-d2s: {method: granet, init_density: 1.0}
      rigl: {method: rigl}
    grid:                       # lists of values of any key; every combination is a trial
      final_density: [0.1, 0.05, 0.02]
      update_interval: [10]     # optimizer steps
      prune_window: [[0, 2]]    # (prune_start, prune_end) in epochs of the sweep's training
      regrow_fraction: [0.5]
    seeds: [0, 1, 2]            # TrainConfig.seed and GraNetConfig.seed of every trial
    asha: {grace_period: 1, reduction_factor: 2}   # or null: no early stopping

Trials are ordered by final density, then the other grid keys, then variant, then seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from granet_ray.checks import preflight
from granet_ray.config import (
    NAME_PATTERN,
    PRESETS,
    TRIAL_DRIVER_CPU,
    ConfigError,
    RunSettings,
    TrainConfig,
    check_mapping,
    fail,
    flatten,
    is_int,
    is_number,
    load_preset_file,
    override,
    preset,
)

GRID_DIR = Path(__file__).parent / "grids"
FILE_KEYS = ("name", "base", "train", "variants", "grid", "seeds", "asha")
MERGED_KEYS = ("grid", "train", "asha")
# The short tag a grid key contributes to a trial's name (other keys: their field name).
TAGS = {
    "granet.final_density": "df",
    "granet.init_density": "di",
    "granet.method": "m",
    "granet.update_interval": "dt",
    "granet.prune_window": "w",
    "granet.regrow_fraction": "p",
}
# Keys a variant or a grid axis may not set: ``seeds`` sets the seeds, ``train.epochs`` the
# length every trial shares (ASHA compares trials epoch by epoch).
TRIAL_FIXED = ("seed", "granet.seed", "epochs")


@dataclass(frozen=True)
class Asha:
    """ASHA early stopping on validation accuracy, in epochs: a trial is compared at epochs
    ``grace_period * reduction_factor**k`` (below its last epoch) with the trials that reached
    that epoch before it, and goes on only if among the best ``1 / reduction_factor``."""

    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class SweepSpace:
    """A validated search space.

    label: names the sweep. base: the TrainConfig every trial starts from (epochs and fixed
    fields applied). variants: name -> GraNet fields. grid: field -> values, in trial order.
    seeds: one trial per seed for every combination. asha: early stopping, or None.
    """

    label: str
    base: TrainConfig
    variants: dict[str, dict[str, Any]]
    grid: dict[str, list[Any]]
    seeds: tuple[int, ...]
    asha: Asha | None


@dataclass(frozen=True)
class TrialPoint:
    """One trial: ``name`` (its folder and Ray run name, stable across restarts) is ``group``
    (the configuration without the seed) plus ``_s<seed>``."""

    name: str
    group: str
    variant: str
    seed: int
    train: TrainConfig


def read_grid_file(source: str | Path) -> tuple[dict[str, Any], Path]:
    """The parsed grid file and its folder. ``source``: a packaged grid's name (``paper``,
    ``compare``, ``smoke``; see ``GRID_DIR``) or a YAML/JSON file path."""
    packaged = GRID_DIR / f"{source}.yaml"
    path = packaged if re.fullmatch(r"[\w-]+", str(source)) and packaged.is_file() else Path(source)
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in GRID_DIR.glob("*.yaml")))
        raise fail("grid", str(source), f"a packaged grid ({names}) or a YAML/JSON file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"grid file {path}: not valid YAML/JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"grid file {path}: must hold a mapping of {', '.join(FILE_KEYS)}")
    data.setdefault("name", path.stem)
    return data, path.parent


def merge(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with ``overrides`` applied: ``grid``, ``train`` and ``asha`` mappings are
    merged key by key (``grid`` and ``train`` keys compared in their dotted form, so
    ``final_density`` and ``granet.final_density`` are one key), every other key is
    replaced."""
    merged = dict(data)
    for key, value in overrides.items():
        old = merged.get(key)
        if key in MERGED_KEYS and isinstance(old, dict) and isinstance(value, dict):
            if key != "asha":
                old, value = flatten(old, key), flatten(value, key)
            merged[key] = {**old, **value}
        else:
            merged[key] = value
    return merged


def parse_space(data: Mapping[str, Any], folder: Path = Path(".")) -> SweepSpace:
    """Check a grid mapping's structure and build its ``SweepSpace``; ``folder`` resolves a
    relative ``base`` file. Raises ``ConfigError`` naming the field."""
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown grid key(s) {', '.join(unknown)}; known: {', '.join(FILE_KEYS)}"
        )
    label = data.get("name", "sweep")
    if not (isinstance(label, str) and NAME_PATTERN.fullmatch(label)):
        raise fail("name", label, "letters, digits, '_', '.', '-'")
    base = _base(data, folder)
    return SweepSpace(
        label=label,
        base=base,
        variants=_variants(data.get("variants")),
        grid=_grid(data.get("grid") or {}, has_variants=bool(data.get("variants"))),
        seeds=_seeds(data.get("seeds", [0])),
        asha=_asha(data.get("asha"), base.epochs),
    )


def load_space(
    source: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> SweepSpace:
    """A ``SweepSpace`` from a packaged grid name, a grid file or a mapping, with
    ``overrides`` (same keys as the file, e.g. from flags) applied first."""
    if isinstance(source, Mapping):
        data, folder = dict(source), Path(".")
    else:
        data, folder = read_grid_file(source)
    return parse_space(merge(data, overrides or {}), folder)


def _base(data: Mapping[str, Any], folder: Path) -> TrainConfig:
    name = data.get("base", "mnist_demo")
    if isinstance(name, str) and name in PRESETS:
        train = preset(name)
    elif isinstance(name, str) and (folder / name).is_file():
        train = load_preset_file(folder / name)
    else:
        raise fail("base", name, f"a preset ({', '.join(PRESETS)}) or a preset file")
    fixed = flatten(data.get("train") or {}, "train")
    for key in ("seed", "granet.seed"):
        if key in fixed:
            raise fail(f"train.{key}", fixed[key], "set by the top-level key seeds")
    return override(train, fixed, "train")


def _variants(variants: Any) -> dict[str, dict[str, Any]]:
    if variants is None:
        return {}
    if not (isinstance(variants, dict) and variants):
        raise fail("variants", variants, "a non-empty mapping of name: {GraNet fields}")
    result = {}
    for name, fields in variants.items():
        if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
            raise fail("variants", name, "names of letters, digits, '_', '.', '-'")
        result[name] = _trial_keys(flatten(fields, f"variants.{name}"), f"variants.{name}")
    return result


def _trial_keys(changes: dict[str, Any], where: str) -> dict[str, Any]:
    """``changes`` after checking it sets none of ``TRIAL_FIXED``."""
    for key in TRIAL_FIXED:
        if key in changes:
            raise fail(f"{where}.{key}", changes[key], "set for the whole sweep (train, seeds)")
    return changes


def _grid(grid: Any, *, has_variants: bool) -> dict[str, list[Any]]:
    grid = _trial_keys(flatten(grid, "grid"), "grid")
    for name, values in grid.items():
        if not (isinstance(values, list) and values):
            raise fail(f"grid.{_short(name)}", values, "a non-empty list of values")
        keys = [json.dumps(v) for v in values]
        if len(set(keys)) != len(keys):
            raise fail(f"grid.{_short(name)}", values, "a list without duplicates")
        tags = [_tag(v) for v in values]
        for i, tag in enumerate(tags):
            if tag in tags[:i]:
                raise fail(
                    f"grid.{_short(name)}",
                    values,
                    f"values that differ in a trial's name: {values[tags.index(tag)]!r} and "
                    f"{values[i]!r} both read {tag!r}",
                )
    for window in grid.get("granet.prune_window", []):
        if not (isinstance(window, list) and len(window) == 2 and all(map(is_number, window))):
            raise fail("grid.prune_window", window, "a list of [prune_start, prune_end] pairs")
    if not has_variants and "granet.method" not in grid:
        raise ConfigError("the grid needs variants or grid.method: no method to train")
    first = "granet.final_density"
    order = [first, *(k for k in TAGS if k != first), *(k for k in grid if k not in TAGS)]
    return {k: list(grid[k]) for k in order if k in grid}


def _short(key: str) -> str:
    """A key as grid files usually spell it (``granet.`` dropped)."""
    return key.removeprefix("granet.")


def _seeds(seeds: Any) -> tuple[int, ...]:
    if not (isinstance(seeds, list) and seeds and all(is_int(s) and s >= 0 for s in seeds)):
        raise fail("seeds", seeds, "a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise fail("seeds", seeds, "a list without duplicates")
    return tuple(seeds)


def _asha(asha: Any, epochs: int) -> Asha | None:
    if asha is None or asha is False:
        return None
    check_mapping(asha, ("grace_period", "reduction_factor"), "asha")
    result = Asha(**asha)
    if not (is_int(result.grace_period) and 1 <= result.grace_period < epochs):
        raise fail(
            "asha.grace_period",
            result.grace_period,
            f"an integer of epochs in [1, epochs={epochs})",
        )
    if not (is_number(result.reduction_factor) and result.reduction_factor > 1):
        raise fail("asha.reduction_factor", result.reduction_factor, "a number > 1")
    return result


def _tag(value: Any) -> str:
    if isinstance(value, list):
        return "-".join(_tag(v) for v in value)
    return f"{value:g}" if is_number(value) else str(value)


def expand(space: SweepSpace) -> list[TrialPoint]:
    """Every trial of ``space``, each with a validated ``TrainConfig``; a combination that
    makes an invalid config raises ``ConfigError`` naming the trial and the field."""
    variants = space.variants or {"": {}}
    for name, fields in variants.items():
        both = sorted(set(fields) & set(space.grid))
        if both:
            raise ConfigError(
                f"variants.{name} and grid both set {', '.join(map(_short, both))}: set each "
                "field in one place"
            )
    points = []
    for combo in itertools.product(*space.grid.values()):
        values = dict(zip(space.grid, combo, strict=True))
        for variant, fields in variants.items():
            parts = [variant] if variant else []
            parts += [f"{TAGS.get(k, _short(k))}{_tag(v)}" for k, v in values.items()]
            group = "_".join(parts)
            for seed in space.seeds:
                name = f"{group}_s{seed}"
                changes = {**fields, **values, "seed": seed, "granet.seed": seed}
                try:
                    train = override(space.base, changes)
                except ConfigError as err:
                    raise ConfigError(f"trial {name}: {err}") from None
                label = variant or train.granet.method
                points.append(TrialPoint(name, group, label, seed, train))
    if len({p.name for p in points}) != len(points):
        raise ConfigError("two trials share a name: variant names must differ from each other")
    return points


def validate(space: SweepSpace, run: RunSettings) -> list[TrialPoint]:
    """``expand(space)``, then each configuration checked against the real dataset, model
    and step schedule at ``run``'s worker count, before any trial starts (once per group:
    the seed changes no check)."""
    points = expand(space)
    checked = set()
    for point in points:
        if point.group in checked:
            continue
        checked.add(point.group)
        try:
            preflight(point.train, run.num_workers)
        except ConfigError as err:
            raise ConfigError(f"trial {point.name}: {err}") from None
    return points


def settle_asha(space: SweepSpace, points: Sequence[TrialPoint]) -> tuple[SweepSpace, str | None]:
    """``space`` with its ASHA's first rung after every trial's pruning window (grace period
    >= the latest ``prune_end`` of a pruning method, in epochs): before it trials sit at
    different densities, so a cut would compare unlike with like. Returns the space and a
    message saying what was changed (None when nothing was)."""
    asha = space.asha
    ends = [p.train.granet.prune_end for p in points if p.train.granet.prunes]
    if asha is None or not ends or asha.grace_period >= max(ends):
        return space, None
    grace = math.ceil(max(ends))
    why = f"pruning windows end at epoch {max(ends):g}"
    if grace >= space.base.epochs:
        message = f"ASHA early stopping is off: {why}, and no epoch after that precedes the last"
        return dataclasses.replace(space, asha=None), message
    message = f"ASHA grace_period {asha.grace_period} -> {grace} epochs: {why}"
    return dataclasses.replace(space, asha=dataclasses.replace(asha, grace_period=grace)), message


def sweep_name(space: SweepSpace, points: Sequence[TrialPoint], run: RunSettings) -> str:
    """``sweep-<label>-<8 hex>``: the same space, worker count and early stopping give the
    same name, so running the same command again resumes the same sweep."""
    return f"sweep-{space.label}-{space_digest(space, points, run)[:8]}"


def space_digest(space: SweepSpace, points: Sequence[TrialPoint], run: RunSettings) -> str:
    """SHA-256 of what decides the sweep's results: every trial's name and configuration,
    the workers per trial and the early stopping."""
    content = {
        "trials": [[p.name, p.train.to_dict()] for p in points],
        "num_workers": run.num_workers,
        "asha": None if space.asha is None else dataclasses.asdict(space.asha),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def trial_resources(run: RunSettings) -> dict[str, float]:
    """Resources one trial holds: its Tune driver and its Ray Train workers."""
    need = {"CPU": TRIAL_DRIVER_CPU + run.num_workers * run.cpus_per_worker}
    if run.use_gpu:
        need["GPU"] = run.num_workers * run.gpus_per_worker
    return need


def max_concurrent_trials(cluster: Mapping[str, float], run: RunSettings) -> int:
    """How many trials fit on ``cluster`` (``ray.cluster_resources()``) at once; raises
    ``ConfigError`` when not even one does."""
    need = trial_resources(run)
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items())
    if fits < 1:
        wanted = ", ".join(f"{v:g} {k}" for k, v in need.items())
        have = ", ".join(f"{cluster.get(k, 0.0):g} {k}" for k in need)
        raise ConfigError(
            f"num_workers={run.num_workers} is invalid: one trial needs {wanted} "
            f"(workers x cpus_per_worker / gpus_per_worker) but the cluster has {have}"
        )
    return fits
