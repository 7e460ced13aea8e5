"""ResNet-50 on ImageNet with GraNet, the paper's preset (spec section 7), on a Ray cluster.

    ray job submit --working-dir . -- python jobs/imagenet_resnet50.py \
        --data-root /mnt/imagenet --storage s3://my-bucket/granet --num-workers 8 \
        --gpus-per-worker 1 --cpus-per-worker 8

``--data-root`` is an ImageFolder tree (train/ and val/) on every worker's disk or a shared
mount. ``--synthetic`` runs a smoke test on random 224x224 images instead (defaults: 32
images, 2 epochs, batch 4, a mask update every 2 steps). Also runs as plain
``python jobs/imagenet_resnet50.py`` (a private local Ray unless --address/$RAY_ADDRESS).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from granet_ray.config import preset
from granet_ray.train.jobs import common_parser, guarded, launch, run_settings, train_config

SMOKE = {"train_size": 32, "epochs": 2, "batch_size": 4, "update_interval": 2}


@guarded
def main(argv: Sequence[str] | None = None) -> int:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="ImageFolder root holding train/ and val/")
    parser.add_argument(
        "--synthetic", action="store_true", help="random images: a smoke run without data"
    )
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    args = parser.parse_args(argv)
    base = preset("imagenet_resnet50").replace(amp=not args.no_amp)
    if args.synthetic:
        base = base.replace(dataset="synthetic_imagenet")
        for flag, value in SMOKE.items():
            if getattr(args, flag) is None:
                setattr(args, flag, value)
    elif not args.data_root:
        parser.error("--data-root is required (or --synthetic for a smoke run)")
    train = train_config(base, args)
    run = run_settings(args)
    launch(train, run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
