"""ResNet-20 (or VGG-19-BN) on CIFAR-10 with GraNet, the paper's preset (spec section 7).

    ray job submit --working-dir . -- python jobs/cifar10_resnet20.py \
        --data-root /data/cifar10 --model vgg19_bn --final-density 0.05

``--data-root`` holds torchvision's ``cifar-10-batches-py`` (nothing is downloaded).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from granet_ray.config import preset
from granet_ray.train.jobs import common_parser, guarded, launch, run_settings, train_config

PRESETS = {"resnet20": "cifar10_resnet20", "vgg19_bn": "cifar10_vgg19"}


@guarded
def main(argv: Sequence[str] | None = None) -> int:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="resnet20")
    parser.add_argument("--data-root", required=True, help="folder with cifar-10-batches-py")
    args = parser.parse_args(argv)
    train = train_config(preset(PRESETS[args.model]), args)
    run = run_settings(args)
    launch(train, run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
