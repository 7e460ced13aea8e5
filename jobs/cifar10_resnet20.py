"""ResNet-20 (or, with --model vgg19_bn, VGG-19-BN) on CIFAR-10 with GraNet, the paper's
preset (docs/algorithm.md section 7), on Ray Train workers.

    ray job submit --working-dir . -- python jobs/cifar10_resnet20.py \\
        --data-root /data/cifar10 --model vgg19_bn --final-density 0.05 --num-workers 4

``--data-root`` holds torchvision's ``cifar-10-batches-py`` (nothing is downloaded); every
flag of ``granet-ray fit`` applies.
"""

import sys

from granet_ray.cli import job

main = job("fit", "--preset", "cifar10_resnet20")

if __name__ == "__main__":
    sys.exit(main())
