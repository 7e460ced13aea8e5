"""The sweep job's flags: a grid (packaged name or YAML/JSON file) with flags that replace its
fields, where the trials run and store, and the conversion of flags into a ``SweepSpace`` and
the trials' ``RunSettings``, all checked before Ray is contacted."""

from __future__ import annotations

import argparse
from typing import Any

from granet_ray.config import METHODS
from granet_ray.train.settings import default_storage_path
from granet_ray.tune.space import SweepSpace, load_space


def _window(text: str) -> list[float]:
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return [float(start), float(end)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not START:END (epochs, e.g. 0:1.5)"
        ) from None


def sweep_parser(description: str) -> argparse.ArgumentParser:
    """The sweep job's flags. Space flags replace the grid file's value of the same field."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--grid",
        default="paper",
        help="a packaged grid (paper, compare, smoke) or a YAML/JSON grid file",
    )
    parser.add_argument("--dry-run", action="store_true", help="check and list trials, run none")
    where = parser.add_argument_group("where the trials run and store")
    where.add_argument("--num-workers", type=int, default=1, help="Ray Train workers per trial")
    where.add_argument("--cpus-per-worker", type=float, default=0.99)
    where.add_argument("--gpus-per-worker", type=float, default=0.0)
    where.add_argument(
        "--max-concurrent",
        type=int,
        help="trials at once (default: as many as the cluster's resources hold)",
    )
    where.add_argument(
        "--storage",
        default=default_storage_path(),
        help="sweep folder root: a local path or s3://bucket/prefix ($GRANET_RAY_STORAGE)",
    )
    where.add_argument(
        "--s3-endpoint",
        help="S3-compatible endpoint URL; credentials from AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY, else the AWS default chain",
    )
    where.add_argument(
        "--name",
        help="sweep name (default: derived from the space, so the same command resumes)",
    )
    where.add_argument("--checkpoint-every", type=int, default=1, help="epochs")
    where.add_argument("--max-failures", type=int, default=0, help="per trial's Train run")
    where.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else local)")
    where.add_argument("--no-progress", action="store_true", help="no live display or tables")
    space = parser.add_argument_group("space (default: the grid file's)")
    space.add_argument("--epochs", type=int, help="scale the base's schedule to this many epochs")
    space.add_argument("--train-size", type=int, help="training samples")
    space.add_argument("--batch-size", type=int, help="per worker")
    space.add_argument("--lr", type=float)
    space.add_argument("--method", nargs="+", choices=METHODS, help="replace the variants")
    space.add_argument("--init-density", nargs="+", type=float, metavar="D_I")
    space.add_argument("--final-density", nargs="+", type=float, metavar="D_F")
    space.add_argument("--update-interval", nargs="+", type=int, metavar="STEPS")
    space.add_argument("--prune-window", nargs="+", type=_window, metavar="START:END")
    space.add_argument("--regrow-fraction", nargs="+", type=float, metavar="P0")
    space.add_argument("--seeds", nargs="+", type=int)
    space.add_argument("--no-asha", action="store_true", help="no early stopping")
    space.add_argument("--grace-period", type=int, help="ASHA: epochs before the first cut")
    space.add_argument("--reduction-factor", type=float, help="ASHA: keep 1/this at each cut")
    return parser


GRID_FLAGS = ("init_density", "final_density", "update_interval", "prune_window", "regrow_fraction")
TRAIN_FLAGS = ("train_size", "batch_size", "lr")


def space_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The space flags that were given, as grid-file keys (see ``space.merge``)."""
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    train = {f: getattr(args, f) for f in TRAIN_FLAGS if getattr(args, f) is not None}
    if train:
        overrides["train"] = train
    grid = {f: getattr(args, f) for f in GRID_FLAGS if getattr(args, f) is not None}
    if grid:
        overrides["grid"] = grid
    if args.method:
        overrides["variants"] = {m: {"method": m} for m in args.method}
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    asha = {"grace_period": args.grace_period, "reduction_factor": args.reduction_factor}
    asha = {k: v for k, v in asha.items() if v is not None}
    if args.no_asha:
        overrides["asha"] = None
    elif asha:
        overrides["asha"] = asha
    return overrides


def space_from_args(args: argparse.Namespace) -> SweepSpace:
    """The grid of ``--grid`` with the space flags applied."""
    return load_space(args.grid, space_overrides(args))
