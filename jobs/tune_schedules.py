"""A Ray Tune sweep over GraNet schedules: every trial a Ray Train run, ASHA early stopping,
a table, a Pareto plot of accuracy against sparsity and the best preset per sparsity level.

    python jobs/tune_schedules.py                      # the paper's grid on MNIST-5k
    python jobs/tune_schedules.py --grid compare       # granet / gmp / rigl / set, 3 seeds
    python jobs/tune_schedules.py --grid my.yaml --final-density 0.1 0.05 --seeds 0 1
    ray job submit --working-dir . -- python jobs/tune_schedules.py --grid smoke

Running the same command again resumes an interrupted sweep (finished trials are not run
again) or, when it had finished, prints its results again. Results land in
``<storage>/<sweep>/results``: ``trials.csv``, ``summary.md``, ``pareto.png`` and
``presets/best-density-<d_f>.json`` (a ``TrainConfig`` as JSON: ``load_preset_file``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console

from granet_ray.train.jobs import guarded, run_settings
from granet_ray.tune import validate
from granet_ray.tune.driver import connect, sweep
from granet_ray.tune.jobs import space_from_args, sweep_parser
from granet_ray.tune.results import TrialRow, trials_table
from granet_ray.tune.space import sweep_name


@guarded
def main(argv: Sequence[str] | None = None) -> int:
    args = sweep_parser(__doc__.splitlines()[0]).parse_args(argv)
    space = space_from_args(args)
    run = run_settings(args)
    points = validate(space, run)  # every trial, before Ray is contacted
    if args.dry_run:
        rows = [TrialRow(p.name, p.group, p.variant, p.seed, p.train, "planned") for p in points]
        name = run.name or sweep_name(space, points, run)
        Console().print(trials_table(rows, title=f"sweep {name}: {len(rows)} trials (dry run)"))
        return 0
    connect(args.address)
    outcome = sweep(space, run, max_concurrent=args.max_concurrent, progress=not args.no_progress)
    return 0 if outcome.complete else 1


if __name__ == "__main__":
    sys.exit(main())
