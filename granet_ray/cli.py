"""The ``granet-ray`` command: command groups, e.g. ``granet-ray ckpt inspect URI``.

Each group registers its sub-commands with ``add_<group>_commands``; every command is a
function ``(args, console) -> exit code``. Errors of the package print one red line and exit 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from granet_ray.config import ConfigError
from granet_ray.store.errors import CheckpointError


def _bytes(count: int) -> str:
    """Decimal human-readable size: 980 B, 12.3 kB, 4.5 MB, 1.2 GB."""
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _storage_options(pairs: list[str] | None) -> dict[str, Any] | None:
    """``k=v`` pairs as s3fs options; a value that is JSON true / false / an object or a list
    is decoded (e.g. ``config_kwargs={"connect_timeout": 5}``), anything else is a string."""
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CheckpointError(f"--storage-option {pair!r} must look like key=value")
        if value in ("true", "false") or value[:1] in ("{", "["):
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"--storage-option {key}: invalid JSON ({exc})") from None
        else:
            options[key] = value
    return options


def _add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option",
        action="append",
        metavar="KEY=VALUE",
        help="s3fs option for s3:// URIs, repeatable (key, secret, endpoint_url, ...)",
    )


def ckpt_inspect(args: argparse.Namespace, console: Console) -> int:
    """Table of a checkpoint's tensors: shape, density, bytes, share of the total."""
    from granet_ray.store.summary import summarize

    summary = summarize(args.uri, _storage_options(args.storage_option))
    table = Table()
    table.add_column("tensor", overflow="fold")
    table.add_column("shape")
    table.add_column("density", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    for t in summary.tensors:
        share = t.bytes / summary.total_bytes if summary.total_bytes else 0.0
        shape = "x".join(map(str, t.shape)) or "scalar"
        table.add_row(t.name, shape, f"{t.density:.3f}", _bytes(t.bytes), f"{share:.1%}")
    if summary.optimizer_bytes:
        share = summary.optimizer_bytes / summary.total_bytes
        table.add_row("(optimizer state)", "", "", _bytes(summary.optimizer_bytes), f"{share:.1%}")
    console.print(summary.uri, highlight=False, soft_wrap=True)
    console.print(table)
    ratio = summary.total_bytes / summary.dense_bytes if summary.dense_bytes else 0.0
    console.print(
        f"total {_bytes(summary.total_bytes)} ({summary.total_bytes} bytes in "
        f"{summary.file_count} files) against dense {_bytes(summary.dense_bytes)} "
        f"({summary.dense_bytes} bytes): {ratio:.3f} of dense",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def ckpt_export(args: argparse.Namespace, console: Console) -> int:
    """Write a dense safetensors file of the checkpoint's model weights."""
    from granet_ray.store.export import export_safetensors

    out = export_safetensors(
        args.uri,
        args.out,
        storage_options=_storage_options(args.storage_option),
        overwrite=args.overwrite,
    )
    console.print(f"wrote {out}", highlight=False, soft_wrap=True)
    return 0


def add_ckpt_commands(groups: argparse._SubParsersAction) -> None:
    """The ``ckpt`` group: inspect and export sparse checkpoints."""
    ckpt = groups.add_parser("ckpt", help="inspect and export sparse checkpoints")
    commands = ckpt.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser("inspect", help="per-tensor density and bytes")
    inspect.add_argument("uri", help="checkpoint: local path, file:// or s3://bucket/prefix")
    _add_storage_option(inspect)
    inspect.set_defaults(handler=ckpt_inspect)
    export = commands.add_parser("export", help="write a dense safetensors file")
    export.add_argument("uri", help="checkpoint: local path, file:// or s3://bucket/prefix")
    export.add_argument("out", help="output .safetensors path (local or s3://)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _add_storage_option(export)
    export.set_defaults(handler=ckpt_export)


def train_local(args: argparse.Namespace, console: Console) -> int:
    """Train a preset in this process (no Ray) and print the per-layer table."""
    from granet_ray.config import preset
    from granet_ray.single import train_single

    cfg = preset(args.preset)
    changes = {
        k: getattr(args, k) for k in ("epochs", "train_size", "data_root") if getattr(args, k)
    }
    granet = {k: getattr(args, k) for k in ("method", "final_density") if getattr(args, k)}
    cfg = cfg.replace(**changes, granet=granet)
    train_single(cfg, device=args.device, console=console)
    return 0


def add_train_command(groups: argparse._SubParsersAction) -> None:
    """``train``: a single-process GraNet run (the Ray jobs live in jobs/)."""
    from granet_ray.config import METHODS, PRESETS

    train = groups.add_parser("train", help="train a preset in this process, without Ray")
    train.add_argument("--preset", default="mnist_demo", choices=sorted(PRESETS))
    train.add_argument("--epochs", type=int, help="override the preset's epochs")
    train.add_argument("--method", choices=METHODS, help="override the GraNet method")
    train.add_argument("--final-density", type=float, help="override d_f")
    train.add_argument("--train-size", type=int, help="keep only N training samples")
    train.add_argument("--data-root", help="dataset folder (cifar10, imagenet)")
    train.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    train.set_defaults(handler=train_local)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command group."""
    parser = argparse.ArgumentParser(
        prog="granet-ray",
        description="GraNet sparse training on Ray: tools and a single-process run.",
    )
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    add_ckpt_commands(groups)
    add_train_command(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for usage errors and failures)."""
    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough to keep a row on one line
        console = Console(width=max(console.width, 160))
    try:
        return args.handler(args, console)
    except (CheckpointError, ConfigError, ValueError, FileNotFoundError) as exc:
        Console(stderr=True).print(Text(f"error: {exc}", style="red"), soft_wrap=True)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
