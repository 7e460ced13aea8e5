"""The ``granet-ray`` command line, the one set of flags every job in ``jobs/`` uses:

    granet-ray train ...          a run in this process (no Ray)
    granet-ray fit ...            a run on Ray Train workers
    granet-ray sweep ...          a Ray Tune sweep over GraNet schedules
    granet-ray ckpt inspect URI   a checkpoint's tensors (verified)
    granet-ray ckpt export URI OUT
    granet-ray ckpt gc RUN_URI    a run folder's orphaned data files (--yes deletes)
    granet-ray ckpt bench URI --model NAME   sparse CPU inference against dense, per layer

Flag groups (each flag has one default and one meaning everywhere, also in grid files):
recipe (preset, model, data, schedule), scale (workers and failures), storage, output.
Everything is checked before Ray starts: configuration, data the driver can see and the
storage (reachable, credentials accepted, writable). Errors print one line ``error: ...``
and exit non-zero (2: bad input, 1: the run failed); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.text import Text

from granet_ray.config import (
    FIELD_CHOICES,
    KEEP_BEST_METRICS,
    PRESETS,
    TRIAL_DRIVER_CPU,
    ConfigError,
    RunSettings,
    TrainConfig,
    changes,
    default_storage_path,
    field_kind,
    is_s3,
    load_preset_file,
    override,
    parse_value,
    preset,
    resolve_key,
)
from granet_ray.store.errors import CheckpointError
from granet_ray.ui import console as default_console

# --synthetic: random images in the dataset's shape, a smoke-sized run unless flags say more.
SMOKE = {"train_size": 64, "epochs": 2, "global_batch": 16, "granet.update_interval": 2}


@dataclass(frozen=True)
class Flag:
    """A recipe flag: ``--<last part of key, with dashes>`` sets override ``key`` (its type
    and choices come from the config field). ``axis``: in a sweep it takes several values,
    one grid axis (``granet.method``: one variant per method)."""

    key: str
    help: str
    axis: bool = False
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.key.rpartition(".")[2]

    @property
    def option(self) -> str:
        return "--" + self.dest.replace("_", "-")


# Every recipe flag, one row each: what ``train``, ``fit`` and ``sweep`` accept besides
# ``--preset``, ``--preset-file``, ``--synthetic`` and ``--set KEY=VALUE`` (any field).
RECIPE_FLAGS = (
    Flag(
        "model",
        "replace the preset's model: a built-in name (e.g. vgg19_bn), pkg.module:factory "
        "(called as factory(num_classes=N)) or timm:<name> (the timm extra)",
    ),
    Flag(
        "dataset",
        "replace the preset's dataset: a built-in name or pkg.module:factory (called as "
        "factory(root=..., seed=...), returning (train, test, num_classes))",
    ),
    Flag("data_root", "the dataset's folder (cifar10, imagenet; root= of a factory)"),
    Flag("train_size", "use only this many training samples"),
    Flag(
        "epochs",
        "train this many epochs; the epoch-based schedule (pruning window, LR milestones, "
        "warm-up) is scaled to match, and a shorter run's update interval too",
    ),
    Flag(
        "global_batch",
        "samples per optimizer step over all workers; another value than the preset's "
        "scales the LR linearly and the update interval inversely",
    ),
    Flag("max_batch_per_worker", "the most one worker's forward pass takes; more is accumulated"),
    Flag("lr", "the learning rate (after --global-batch scaling)"),
    Flag("optimizer", "adamw: decoupled weight decay, none on norms, biases and embeddings"),
    Flag("weight_decay", "the optimizer's weight decay"),
    Flag(
        "lr_schedule",
        "after the warm-up: step (x lr_gamma at lr_milestones) or cosine (down to lr_min at "
        "the last step)",
    ),
    Flag(
        "grad_clip",
        "clip gradients to this global L2 norm before each optimizer step",
        metavar="NORM",
    ),
    Flag("precision", "autocast precision (auto: bf16 or fp16 on GPUs, fp32 on the CPU)"),
    Flag("channels_last", "conv nets on CUDA in the channels-last memory format"),
    Flag("compile", "run the model through torch.compile"),
    Flag("sync_bn", "SyncBatchNorm across workers (CUDA workers)"),
    Flag(
        "sparse_allreduce",
        "under DDP, all-reduce only the active weights' gradients between mask updates",
    ),
    Flag("seed", "seeds weights, data order and augmentation (a sweep: --seeds)"),
    Flag("granet.method", "the sparse-training method", axis=True),
    Flag("granet.init_density", "d_i (1.0 = dense-to-sparse)", axis=True, metavar="D_I"),
    Flag("granet.final_density", "d_f (0.1 = 90%% sparsity)", axis=True, metavar="D_F"),
    Flag(
        "granet.update_interval",
        "global optimizer steps between mask updates",
        axis=True,
        metavar="STEPS",
    ),
    Flag(
        "granet.prune_window",
        "gradual pruning window in epochs",
        axis=True,
        metavar="START:END",
    ),
    Flag(
        "granet.regrow_fraction",
        "initial regeneration fraction (default: the method's)",
        axis=True,
        metavar="P0",
    ),
    Flag("granet.prune_scope", "global or per-layer pruning (default: the method's)"),
    Flag(
        "granet.keep_dense",
        "weights kept dense, by parameter or module name pattern (fnmatch), comma-separated",
        metavar="'PATTERN,...'",
    ),
)


def _workers(text: str) -> tuple[int, int]:
    """``N`` (fixed) or ``MIN:MAX`` (elastic) workers."""
    low, sep, high = text.partition(":")
    try:
        return (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or MIN:MAX (e.g. 2 or 2:8)") from None


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


def _pair(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: the key resolved, the value read as its field's type."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. lr=0.05)")
    try:
        key = resolve_key(key.strip())
        return key, parse_value(key, value)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _value_type(key: str) -> Callable[[str], Any]:
    """The argparse type of a flag's values: its config field's type."""
    if key == "granet.prune_window":
        return _window

    def parse(text: str) -> Any:
        try:
            return parse_value(key, text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = field_kind(key)
    return parse


# ---- flag groups ----------------------------------------------------------------------------


def add_recipe_flags(parser: argparse.ArgumentParser, *, grid: bool = False) -> None:
    """The recipe flags of ``RECIPE_FLAGS`` (defaults: the preset's). With ``grid`` (a sweep)
    the axis flags take several values, each replacing the grid file's list."""
    g = parser.add_argument_group(
        "recipe (defaults: the preset's" + (" or grid file's)" if grid else ")")
    )
    g.add_argument("--preset", choices=sorted(PRESETS), help="the paper's settings to start from")
    g.add_argument(
        "--preset-file",
        help="a TrainConfig JSON/YAML file (e.g. a sweep's best-density-*.json) instead of "
        "--preset",
    )
    g.add_argument(
        "--synthetic",
        action="store_true",
        help="random images in the dataset's shape: a smoke run of "
        f"{SMOKE['train_size']} samples, {SMOKE['epochs']} epochs, global batch "
        f"{SMOKE['global_batch']} unless those flags are given",
    )
    for flag in RECIPE_FLAGS:
        if grid and flag.key == "seed":
            g.add_argument("--seeds", nargs="+", type=int, help="one trial per seed")
            continue
        options: dict[str, Any] = {"dest": flag.dest, "help": flag.help}
        kind = field_kind(flag.key)
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(type=_value_type(flag.key), metavar=flag.metavar)
            choices = FIELD_CHOICES.get(flag.key)
            if choices:
                options.update(choices=list(choices), metavar=None)
            if grid and flag.axis:
                options["nargs"] = "+"
        g.add_argument(flag.option, **options)
    g.add_argument(
        "--set",
        type=_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="set any TrainConfig field, e.g. granet.final_density=0.05 or lr_milestones=[30,60] "
        "(repeatable; after the named flags)",
    )


def add_scale_flags(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """Where a run executes: Ray workers, resources, failures."""
    g = parser.add_argument_group("scale" + (" (per trial)" if sweep else ""))
    g.add_argument(
        "--num-workers",
        type=_workers,
        default=(1, 1),
        metavar="N|MIN:MAX",
        help="Ray Train workers of a run; MIN:MAX trains elastically between the two",
    )
    g.add_argument(
        "--resize-interval",
        type=float,
        default=60.0,
        help="elastic: seconds between checks for capacity to grow",
    )
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="> 0: CUDA and NCCL")
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        help="CPUs of each worker (default 1, less "
        f"the {TRIAL_DRIVER_CPU} a sweep trial's driver holds); also sets its "
        "data-loader processes to this minus one",
    )
    g.add_argument(
        "--max-failures",
        type=int,
        default=1,
        help="worker-group failures a run recovers from (-1: no limit)",
    )
    g.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    if sweep:
        g.add_argument(
            "--max-concurrent",
            type=int,
            help="trials at once (default: as many as the cluster holds)",
        )


def add_storage_flags(parser: argparse.ArgumentParser) -> None:
    """Where runs store checkpoints and results."""
    g = parser.add_argument_group("storage")
    g.add_argument(
        "--storage",
        default=default_storage_path(),
        help="a local folder or s3://bucket/prefix ($GRANET_RAY_STORAGE)",
    )
    g.add_argument(
        "--s3-endpoint",
        help="an S3-compatible endpoint URL (of --storage and an s3:// --data-root); keys "
        "from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, else the AWS default chain",
    )
    g.add_argument(
        "--data-cache-gb",
        type=float,
        default=RunSettings.data_cache_gb,
        help="the bound of each node's cache of packed-dataset shards (s3:// --data-root)",
    )
    g.add_argument(
        "--data-cache-dir",
        help="the folder of that cache (default ~/.cache/granet-ray/data)",
    )
    g.add_argument("--name", help="the run's (or sweep's) folder; a used name resumes it")
    g.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    g.add_argument(
        "--checkpoint-every-steps",
        type=int,
        help="also a checkpoint every this many global steps inside an epoch",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        metavar="N",
        help="keep the newest N committed checkpoints of the run (default: all)",
    )
    g.add_argument(
        "--keep-best",
        metavar="METRIC",
        help=f"with --keep-checkpoints, also keep the best epoch by METRIC "
        f"({', '.join(KEEP_BEST_METRICS)})",
    )
    watch = parser.add_argument_group("watching")
    watch.add_argument(
        "--no-tensorboard",
        action="store_true",
        help="no TensorBoard event files (default: in the run's folder, <storage>/<name>/tb)",
    )
    watch.add_argument("--mlflow-uri", help="also log to this MLflow tracking URI")
    watch.add_argument(
        "--mlflow-experiment", default="granet-ray", help="the MLflow experiment's name"
    )


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="no live display (the summary and the result are still printed)",
    )
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")


# ---- flags -> configs ---------------------------------------------------------------------


def flag_changes(args: argparse.Namespace, *, axes: bool = True) -> dict[str, Any]:
    """The override keys of the recipe flags that were given, then the ``--set`` pairs
    (later wins); without ``axes`` the sweep's axis flags are left out."""
    given: dict[str, Any] = {}
    for flag in RECIPE_FLAGS:
        value = getattr(args, flag.dest, None)
        if value is not None and (axes or not flag.axis):
            given[flag.key] = value
    given.update(dict(getattr(args, "overrides", [])))
    return given


def base_config(args: argparse.Namespace) -> tuple[TrainConfig, str]:
    """The config the flags start from (the preset or the preset file) and its name."""
    if args.preset and args.preset_file:
        raise ConfigError(
            f"--preset {args.preset} and --preset-file {args.preset_file}: give one of them "
            "(a preset file holds a whole recipe)"
        )
    if args.preset_file:
        return load_preset_file(args.preset_file), args.preset_file
    name = args.preset or "mnist_demo"
    return preset(name), name


def recipe(args: argparse.Namespace) -> tuple[TrainConfig, list[str]]:
    """The ``TrainConfig`` of the recipe flags: the preset (or preset file), then
    ``--synthetic``'s smoke sizes for what the flags leave open, then the flags' and
    ``--set``'s override keys (``config.override``: ``epochs`` / ``global_batch`` rescale
    first). Also the list of what changed from the preset (printed by the jobs)."""
    base, _ = base_config(args)
    given = flag_changes(args)
    train = base
    if args.synthetic:
        chosen = str(given.pop("dataset", train.dataset))  # --dataset: the one to stand in for
        if ":" in chosen:
            raise ConfigError(
                f"synthetic=True is invalid for dataset={chosen!r}: a dataset by reference "
                "has no synthetic stand-in"
            )
        dataset = f"synthetic_{chosen.removeprefix('synthetic_')}"
        smoke = {k: v for k, v in SMOKE.items() if k not in given}
        train = override(train, {"dataset": dataset, **smoke})
    train = override(train, given)
    return train, changes(base, train)


def s3_options(endpoint: str | None) -> dict[str, Any] | None:
    """The S3 options of ``--s3-endpoint`` (keys from AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY when set); None without an endpoint (the AWS default chain)."""
    if not endpoint:
        return None
    options: dict[str, Any] = {"endpoint_url": endpoint}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY")
    return options


def run_settings(args: argparse.Namespace, *, sweep: bool = False) -> RunSettings:
    """``RunSettings`` of the scale and storage flags."""
    options = s3_options(args.s3_endpoint)
    cpus = getattr(args, "cpus_per_worker", None)
    if cpus is None:
        cpus = 1.0 - TRIAL_DRIVER_CPU if sweep else 1.0
    low, high = getattr(args, "num_workers", (1, 1))
    return RunSettings(
        num_workers=high,
        min_workers=low if low != high else None,
        resize_interval=getattr(args, "resize_interval", 60.0),
        gpus_per_worker=getattr(args, "gpus_per_worker", 0.0),
        cpus_per_worker=cpus,
        storage_path=args.storage,
        storage_options=options if is_s3(args.storage) else None,
        data_options=options,
        data_cache_dir=args.data_cache_dir,
        data_cache_gb=args.data_cache_gb,
        name=args.name,
        checkpoint_every=args.checkpoint_every,
        checkpoint_every_steps=args.checkpoint_every_steps,
        max_failures=getattr(args, "max_failures", 1),
        keep_checkpoints=args.keep_checkpoints,
        keep_best=args.keep_best,
        tensorboard=not args.no_tensorboard,
        mlflow_uri=args.mlflow_uri,
        mlflow_experiment=args.mlflow_experiment,
    )


def grid_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep's recipe flags that were given, as grid-file keys (``tune.space.merge``):
    fixed fields under ``train``, axis flags as ``grid`` lists (``--method``: ``variants``)."""
    if args.synthetic:
        raise ConfigError("synthetic=True is invalid for a sweep: set the grid's base dataset")
    overrides: dict[str, Any] = {}
    if args.preset and args.preset_file:
        base_config(args)  # refuses both
    if args.preset_file or args.preset:
        overrides["base"] = os.path.abspath(args.preset_file) if args.preset_file else args.preset
    train = flag_changes(args, axes=False)
    if train:
        overrides["train"] = train
    grid = {
        flag.key: getattr(args, flag.dest)
        for flag in RECIPE_FLAGS
        if flag.axis and flag.key != "granet.method" and getattr(args, flag.dest) is not None
    }
    if grid:
        overrides["grid"] = grid
    if args.method:
        overrides["variants"] = {m: {"granet.method": m} for m in args.method}
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    asha = {"grace_period": args.grace_period, "reduction_factor": args.reduction_factor}
    asha = {k: v for k, v in asha.items() if v is not None}
    if args.no_asha:
        overrides["asha"] = None
    elif asha:
        overrides["asha"] = asha
    return overrides


# ---- commands -------------------------------------------------------------------------------


def _print_recipe(console: Console, train: TrainConfig, changed: list[str], source: str) -> None:
    what = "; ".join(changed) if changed else "as is"
    console.print(
        f"recipe: {train.model} on {train.dataset} from {source}: {what}",
        highlight=False,
        soft_wrap=True,
    )


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    """A run in this process (no Ray), with checkpoints in the run's folder."""
    from granet_ray.local import fit_local

    train, changed = recipe(args)
    run = run_settings(args)
    _print_recipe(console, train, changed, args.preset_file or args.preset or "mnist_demo")
    outcome = fit_local(
        train, run, device=device(args.device), progress=not args.no_progress, console=console
    )
    if args.evaluate_checkpoint:
        _evaluate(console, outcome.checkpoint_uri, train, run)
    return 0


def cmd_fit(args: argparse.Namespace, console: Console) -> int:
    """A run on Ray Train workers (``fit`` checks everything before it contacts Ray)."""
    from granet_ray.train import fit

    train, changed = recipe(args)
    run = run_settings(args)
    _print_recipe(console, train, changed, args.preset_file or args.preset or "mnist_demo")
    outcome = fit(train, run, address=args.address, progress=not args.no_progress, console=console)
    if args.evaluate_checkpoint:
        _evaluate(console, outcome.checkpoint_uri, train, run)
    return 0


def device(name: str | None) -> Any:
    """The ``torch.device`` of ``--device`` (None: CUDA if available); ``ConfigError`` for
    a name torch does not know or a CUDA device this machine does not have."""
    import torch

    if name is None:
        return None
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is invalid: must be cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and (
        not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(f"device={name!r} is invalid: this machine has no such CUDA device")
    if chosen.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r} is invalid: must be cpu, cuda or cuda:N")
    return chosen


def _evaluate(console: Console, uri: str, train: TrainConfig, run: RunSettings) -> None:
    from granet_ray.data import StreamOptions
    from granet_ray.outcome import evaluate_checkpoint

    accuracy, density = evaluate_checkpoint(
        uri, train, storage_options=run.storage_options, stream=StreamOptions.of(run)
    )
    console.print(
        f"loaded {uri} with load_sparse: density {density:.4f} (sparsity {1 - density:.1%}), "
        f"test accuracy of the sparse model [bold]{accuracy:.2%}[/]",
        soft_wrap=True,
    )


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    """A Ray Tune sweep; ``--dry-run`` lists the trials and starts nothing (``sweep`` checks
    every trial and the storage before it contacts Ray)."""
    from granet_ray.tune.space import load_space

    space = load_space(args.grid, grid_overrides(args))
    run = run_settings(args, sweep=True)
    if args.dry_run:
        from granet_ray.tune.results import TrialRow
        from granet_ray.tune.space import settle_asha, sweep_name, validate
        from granet_ray.tune.tables import trials_table

        points = validate(space, run)
        space, note = settle_asha(space, points)
        if note:
            console.print(f"[yellow]{note}[/]", highlight=False)
        rows = [TrialRow(p.name, p.group, p.variant, p.seed, p.train, "planned") for p in points]
        name = run.name or sweep_name(space, points, run)
        console.print(trials_table(rows, title=f"sweep {name}: {len(rows)} trials (dry run)"))
        return 0
    from granet_ray.tune import sweep

    outcome = sweep(
        space,
        run,
        max_concurrent=args.max_concurrent,
        progress=not args.no_progress,
        console=console,
        address=args.address,
    )
    return 0 if outcome.complete else 1


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


def cmd_pack(args: argparse.Namespace, console: Console) -> int:
    """Pack an ImageFolder tree or the CIFAR-10 batches into a sharded dataset."""
    from granet_ray.data.pack import iter_split_sizes, pack
    from granet_ray.ui.progress import LiveBar

    options = s3_options(args.s3_endpoint)
    with LiveBar(console, "pack", status=args.dest, enabled=not args.no_progress) as bar:
        index = pack(
            args.src,
            args.dest,
            storage_options=options,
            shard_mb=args.shard_mb,
            block_shards=args.block_shards,
            progress=lambda done, total: bar.update(completed=done, total=total),
        )
    for split, shards, samples, size in iter_split_sizes(index):
        console.print(
            f"{split}: {samples} images in {shards} shards, {size / 2**20:.1f} MB",
            highlight=False,
        )
    console.print(
        f"packed {len(index.classes)} classes into {index.uri} (fingerprint "
        f"{index.fingerprint[:16]})",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    """A checkpoint's tensors, after verifying every file's size and checksum."""
    from granet_ray.store.summary import summarize
    from granet_ray.ui.tables import checkpoint_table, checkpoint_totals

    summary = summarize(args.uri, _storage_options(args.storage_option), verify=not args.no_verify)
    console.print(summary.uri, highlight=False, soft_wrap=True)
    console.print(checkpoint_table(summary))
    console.print(checkpoint_totals(summary), highlight=False, soft_wrap=True)
    if not args.no_verify:
        console.print(f"verified: {summary.file_count - 1} data files, sizes and sha256 match")
    return 0


def cmd_gc(args: argparse.Namespace, console: Console) -> int:
    """List (dry run) or delete a run folder's orphaned checkpoint data files."""
    from granet_ray.store.gc import collect_orphans, find_orphans

    if args.min_age < 0:
        raise ConfigError(f"--min-age {args.min_age} is invalid: must be minutes >= 0")
    options = _storage_options(args.storage_option)
    orphans = find_orphans(args.run_uri, options, min_age_s=args.min_age * 60)
    total = sum(o.size for o in orphans)
    for orphan in orphans:
        console.print(
            f"{orphan.name}  {orphan.size:,} bytes  {orphan.age_s / 60:.0f} min old",
            highlight=False,
            soft_wrap=True,
        )
    if args.yes:
        collect_orphans(args.run_uri, options, min_age_s=args.min_age * 60, orphans=orphans)
        verb = "deleted"
    else:
        verb = "would delete (dry run; --yes deletes)"
    console.print(
        f"{verb} {len(orphans)} orphaned file(s), {total:,} bytes, older than "
        f"{args.min_age:g} min in {args.run_uri}",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
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


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    """Time the checkpoint's model dense and converted for sparse CPU inference."""
    from granet_ray.ui.inference_table import bench_checkpoint

    return bench_checkpoint(
        args.uri,
        args.model,
        batch=args.batch,
        threads=args.threads,
        repeats=args.repeats,
        storage_options=_storage_options(args.storage_option),
        console=console,
    )


# ---- the parser and main --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="granet-ray", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="a run in this process, without Ray", formatter_class=formatter
    )
    add_recipe_flags(train)
    train.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    train.add_argument(
        "--evaluate-checkpoint",
        action="store_true",
        help="load the final checkpoint with load_sparse and test it",
    )
    add_storage_flags(train)
    add_output_flags(train)
    train.set_defaults(handler=cmd_train)

    fit = commands.add_parser("fit", help="a run on Ray Train workers", formatter_class=formatter)
    add_recipe_flags(fit)
    fit.add_argument(
        "--evaluate-checkpoint",
        action="store_true",
        help="load the final checkpoint with load_sparse and test it here",
    )
    add_scale_flags(fit)
    add_storage_flags(fit)
    add_output_flags(fit)
    fit.set_defaults(handler=cmd_fit)

    sweep = commands.add_parser(
        "sweep", help="a Ray Tune sweep over GraNet schedules", formatter_class=formatter
    )
    sweep.add_argument(
        "--grid",
        default="paper",
        help="a packaged grid (paper, compare, smoke) or a YAML/JSON grid file",
    )
    sweep.add_argument("--dry-run", action="store_true", help="check and list trials, run none")
    add_recipe_flags(sweep, grid=True)
    asha = sweep.add_argument_group("early stopping (default: the grid file's)")
    asha.add_argument("--no-asha", action="store_true", help="every trial runs to the end")
    asha.add_argument("--grace-period", type=int, help="epochs before ASHA's first cut")
    asha.add_argument("--reduction-factor", type=float, help="ASHA keeps 1/this at each cut")
    add_scale_flags(sweep, sweep=True)
    add_storage_flags(sweep)
    add_output_flags(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    data = commands.add_parser("data", help="pack datasets for streaming")
    data_verbs = data.add_subparsers(dest="verb", required=True, metavar="VERB")
    packer = data_verbs.add_parser(
        "pack",
        help="an ImageFolder tree (train/, val/) or the CIFAR-10 batches as a sharded dataset",
        formatter_class=formatter,
    )
    packer.add_argument("src", help="ImageFolder tree or CIFAR-10 python batches folder")
    packer.add_argument("dest", help="a local folder or s3://bucket/prefix")
    packer.add_argument("--shard-mb", type=float, default=64.0, help="megabytes per shard")
    packer.add_argument(
        "--block-shards",
        type=int,
        default=8,
        help="shards per shuffle block: each node's cache holds two blocks",
    )
    packer.add_argument(
        "--s3-endpoint",
        help="an S3-compatible endpoint URL; keys from AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY, else the AWS default chain",
    )
    packer.add_argument("--no-progress", action="store_true", help="no progress bar")
    packer.add_argument("--debug", action="store_true", help="show the traceback of an error")
    packer.set_defaults(handler=cmd_pack)

    ckpt = commands.add_parser("ckpt", help="inspect and export sparse checkpoints")
    verbs = ckpt.add_subparsers(dest="verb", required=True, metavar="VERB")
    inspect = verbs.add_parser("inspect", help="per-tensor density and bytes, verified")
    inspect.add_argument("uri", help="checkpoint: local path, file:// or s3://bucket/prefix")
    inspect.add_argument(
        "--no-verify",
        action="store_true",
        help="read the manifest only: no file sizes or checksums",
    )
    inspect.set_defaults(handler=cmd_inspect)
    export = verbs.add_parser("export", help="write a dense safetensors file")
    export.add_argument("uri", help="checkpoint: local path, file:// or s3://bucket/prefix")
    export.add_argument("out", help="output .safetensors path (local or s3://)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    export.set_defaults(handler=cmd_export)
    gc = verbs.add_parser(
        "gc",
        help="remove data files no committed manifest references (a killed save's)",
        formatter_class=formatter,
    )
    gc.add_argument("run_uri", help="a run's folder: local path, file:// or s3://bucket/prefix")
    gc.add_argument("--yes", action="store_true", help="delete them (default: only list them)")
    gc.add_argument(
        "--min-age",
        type=float,
        default=60.0,
        help="minutes: younger files may belong to a save still in flight and are kept",
    )
    gc.set_defaults(handler=cmd_gc)
    bench = verbs.add_parser(
        "bench",
        help="sparse CPU inference against dense: latency per layer and whole model",
        formatter_class=formatter,
    )
    bench.add_argument("uri", help="checkpoint: local path, file:// or s3://bucket/prefix")
    bench.add_argument("--model", required=True, help="the checkpoint's model, e.g. resnet50")
    bench.add_argument("--batch", type=int, default=32, help="the batch besides batch 1")
    bench.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    bench.add_argument("--repeats", type=int, default=5, help="whole-model timings per path")
    bench.set_defaults(handler=cmd_bench)
    for verb in (inspect, export, gc, bench):  # every verb reads or writes a checkpoint's storage
        verb.add_argument(
            "--storage-option",
            action="append",
            metavar="KEY=VALUE",
            help="s3fs option for s3:// URIs, repeatable (key, secret, endpoint_url)",
        )
        verb.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def root_cause(err: BaseException) -> BaseException:
    """The exception at the bottom of ``err``: inside Ray's worker-group and controller
    errors (the first failed worker's), Ray's task-error wrappers and ``__cause__`` chains."""
    seen: set[int] = set()
    while id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)
        inner = (
            next(iter(failures.values()), None)
            if failures
            else getattr(err, "controller_failure", None)
            or getattr(err, "cause", None)
            or err.__cause__
        )
        if not isinstance(inner, BaseException):
            return err
        err = inner
    return err


def describe(err: BaseException) -> str:
    """One line for an error: our own errors by their message, others with their type."""
    cause = root_cause(err)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if isinstance(cause, (ConfigError, CheckpointError)):
        return text
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2: bad input, 1: the run failed)."""
    args = build_parser().parse_args(argv)
    console = default_console()
    handler: Callable[[argparse.Namespace, Console], int] = args.handler
    try:
        return handler(args, console)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        cause = root_cause(err)
        bad_input = isinstance(cause, (ConfigError, CheckpointError, FileNotFoundError))
        message = Text(f"error: {describe(err)}", style="red")
        default_console(stderr=True).print(message, soft_wrap=True)
        return 2 if bad_input else 1


def job(*fixed: str) -> Callable[[Sequence[str] | None], int]:
    """A job script's ``main``: this command line with ``fixed`` first, then the script's own
    arguments (``sys.argv[1:]``, or the list given), so the user's flags come last. A job's
    ``--preset`` is its default recipe: the user's ``--preset`` or ``--preset-file``
    replaces it."""

    def run(argv: Sequence[str] | None = None) -> int:
        given = list(sys.argv[1:] if argv is None else argv)
        base = list(fixed)
        if "--preset" in base and any(
            a.split("=")[0] in ("--preset", "--preset-file") for a in given
        ):
            at = base.index("--preset")
            del base[at : at + 2]
        return main([*base, *given])

    return run


if __name__ == "__main__":
    raise SystemExit(main())
