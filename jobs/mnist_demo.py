"""The main demo: GraNet on 2 local Ray workers, MNIST-5k, to 90% sparsity, then the result
is loaded back from its Arrow CSR checkpoint with ``load_sparse`` and tested.

    python jobs/mnist_demo.py            # or: make run

Everything runs offline on this machine (a private local Ray unless --address or
$RAY_ADDRESS); checkpoints land under --storage (default ~/granet-ray/runs).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich.console import Console

from granet_ray.config import preset
from granet_ray.train.jobs import (
    common_parser,
    evaluate_checkpoint,
    guarded,
    launch,
    run_settings,
    train_config,
)


@guarded
def main(argv: Sequence[str] | None = None) -> int:
    args = common_parser(__doc__.splitlines()[0]).parse_args(argv)
    train = train_config(preset("mnist_demo"), args)
    run = run_settings(args)
    outcome = launch(train, run, args)
    accuracy, density = evaluate_checkpoint(
        outcome.checkpoint_uri, train, storage_options=run.storage_options
    )
    Console().print(
        f"loaded {outcome.checkpoint_uri} with load_sparse: density {density:.4f} "
        f"(sparsity {1 - density:.1%}), test accuracy of the sparse model "
        f"[bold]{accuracy:.2%}[/]",
        soft_wrap=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
