"""What the job scripts in ``jobs/`` share: flags, flags -> configs, and error handling.

A job parses its flags into a ``TrainConfig`` (from one of the paper's presets) and a
``RunSettings``, both validated before Ray is even contacted; a bad flag exits with status 2
and a one-line message naming the field, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from granet_ray.config import METHODS, ConfigError, TrainConfig
from granet_ray.data import build_datasets
from granet_ray.loop import evaluate
from granet_ray.models import build_model
from granet_ray.store import CheckpointError, load_sparse
from granet_ray.train.preflight import preflight
from granet_ray.train.settings import RunSettings, default_storage_path
from granet_ray.train.trainer import FitOutcome, connect, fit

# Flags that override a TrainConfig field of the same name (dest -> field).
TRAIN_FLAGS = ("batch_size", "lr", "train_size", "seed", "data_root")
GRANET_FLAGS = ("method", "init_density", "final_density", "update_interval")


def common_parser(description: str) -> argparse.ArgumentParser:
    """The flags every job takes: where it runs, where it stores, and the recipe overrides
    (each defaults to the job's preset)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    where = parser.add_argument_group("where it runs and stores")
    where.add_argument("--num-workers", type=int, default=2, help="Ray Train workers")
    where.add_argument("--gpus-per-worker", type=float, default=0.0, help="> 0: CUDA + NCCL")
    where.add_argument("--cpus-per-worker", type=float, default=1.0)
    where.add_argument(
        "--storage",
        default=default_storage_path(),
        help="run folder root: a local path or s3://bucket/prefix ($GRANET_RAY_STORAGE)",
    )
    where.add_argument(
        "--s3-endpoint",
        help="S3-compatible endpoint URL; credentials from AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY, else the AWS default chain (instance role)",
    )
    where.add_argument("--name", help="run name (default: a unique name; a used one resumes)")
    where.add_argument("--checkpoint-every", type=int, default=1, help="epochs")
    where.add_argument("--max-failures", type=int, default=1, help="worker crashes to recover from")
    where.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else local)")
    where.add_argument("--no-progress", action="store_true", help="no live display")
    recipe = parser.add_argument_group("recipe (defaults: the job's preset)")
    recipe.add_argument(
        "--epochs",
        type=int,
        help="train this many epochs; the preset's epoch-based "
        "schedule (pruning window, LR milestones, warm-up) is scaled to match",
    )
    recipe.add_argument("--batch-size", type=int, help="per worker")
    recipe.add_argument("--lr", type=float)
    recipe.add_argument("--train-size", type=int, help="use only this many training samples")
    recipe.add_argument("--seed", type=int)
    recipe.add_argument(
        "--preset-file",
        help="a TrainConfig JSON/YAML file (e.g. a sweep's best-density-*.json) replacing the "
        "job's preset; the other recipe flags still apply on top",
    )
    recipe.add_argument("--method", choices=METHODS)
    recipe.add_argument("--init-density", type=float, help="d_i (1.0 = dense-to-sparse)")
    recipe.add_argument("--final-density", type=float, help="d_f (0.1 = 90%% sparsity)")
    recipe.add_argument("--update-interval", type=int, help="optimizer steps between updates")
    return parser


def with_epochs(train: TrainConfig, epochs: int) -> TrainConfig:
    """``train`` over ``epochs`` epochs with its epoch-based schedule scaled by
    ``epochs / train.epochs``: pruning window and regrowth end exactly, warm-up exactly,
    LR milestones rounded to whole epochs in [1, epochs] (duplicates merged)."""
    if epochs == train.epochs:
        return train
    if not (isinstance(epochs, int) and epochs > 0):
        raise ConfigError(f"epochs={epochs!r} is invalid: must be a positive integer")
    factor = epochs / train.epochs
    g = train.granet
    return train.replace(
        epochs=epochs,
        lr_milestones=tuple(
            sorted({min(epochs, max(1, round(m * factor))) for m in train.lr_milestones})
        ),
        warmup_epochs=train.warmup_epochs * factor,
        granet={
            "prune_start": g.prune_start * factor,
            "prune_end": g.prune_end * factor,
            "regrow_end": None if g.regrow_end is None else g.regrow_end * factor,
        },
    )


def train_config(base: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``base`` (a preset, or ``--preset-file``) with every recipe flag given applied."""
    if getattr(args, "preset_file", None):
        from granet_ray.tune.presets import load_preset_file  # no Ray: a YAML/JSON reader

        base = load_preset_file(args.preset_file)
    train = with_epochs(base, args.epochs) if args.epochs is not None else base
    top = {f: getattr(args, f) for f in TRAIN_FLAGS if getattr(args, f, None) is not None}
    granet = {f: getattr(args, f) for f in GRANET_FLAGS if getattr(args, f) is not None}
    return train.replace(**top, granet=granet)


def run_settings(args: argparse.Namespace) -> RunSettings:
    """``RunSettings`` from the flags of ``common_parser``."""
    options: dict[str, Any] | None = None
    if args.s3_endpoint:
        options = {"endpoint_url": args.s3_endpoint}
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
            options["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY")
    return RunSettings(
        num_workers=args.num_workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        storage_path=args.storage,
        storage_options=options,
        name=args.name,
        checkpoint_every=args.checkpoint_every,
        max_failures=args.max_failures,
    )


def launch(train: TrainConfig, run: RunSettings, args: argparse.Namespace) -> FitOutcome:
    """Check the configuration, then connect to Ray (``--address``) and fit with the
    display unless ``--no-progress``."""
    preflight(train, run.num_workers)
    connect(args.address)
    return fit(train, run, progress=not args.no_progress)


def guarded(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a job's ``main`` so a configuration or checkpoint error prints one line naming
    the problem and exits with status 2 instead of a traceback."""

    def run(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except (ConfigError, CheckpointError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run


def evaluate_checkpoint(
    uri: str, train: TrainConfig, storage_options: dict[str, Any] | None = None
) -> tuple[float, float]:
    """(test accuracy, density of the masked weights) of the sparse model in the checkpoint
    at ``uri``, loaded with ``load_sparse`` into a fresh ``train.model`` on this process."""
    data = build_datasets(train.dataset, train.data_root, seed=train.seed)
    model = build_model(train.model, num_classes=data.num_classes)
    checkpoint = load_sparse(uri, model=model, storage_options=storage_options)
    result = evaluate(model, DataLoader(data.test, batch_size=256), device=torch.device("cpu"))
    masks = checkpoint.masks.values()
    density = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    return result.accuracy, density
