"""ResNet-50 on ImageNet with GraNet, the paper's preset (docs/algorithm.md section 7: global
batch 128, the paper's 2 x 64, at any number of workers), on a Ray cluster.

    ray job submit --working-dir . -- python jobs/imagenet_resnet50.py \\
        --data-root /mnt/imagenet --storage s3://my-bucket/granet --num-workers 8 \\
        --gpus-per-worker 1 --cpus-per-worker 8

``--data-root`` is an ImageFolder tree (train/ and val/) on every worker's disk or a shared
mount, or a dataset packed once with ``granet-ray data pack`` at ``s3://bucket/prefix``,
streamed to the workers with no local copy (docs/streaming-data.md); ``--synthetic`` runs a
smoke test on random 224x224 images instead. Every flag of ``granet-ray fit`` applies.
"""

import sys

from granet_ray.cli import job

main = job("fit", "--preset", "imagenet_resnet50")

if __name__ == "__main__":
    sys.exit(main())
