"""The main demo: GraNet on 2 local Ray workers, MNIST-5k (bundled), to 90% sparsity; then its
final Arrow CSR checkpoint is loaded back with ``load_sparse`` and tested.

    python jobs/mnist_demo.py            # or: make run; every flag of `granet-ray fit`

Everything runs offline on this machine (a private local Ray unless --address or
$RAY_ADDRESS); checkpoints land under --storage (default ~/granet-ray/runs).
"""

import sys

from granet_ray.cli import job

main = job("fit", "--preset", "mnist_demo", "--num-workers", "2", "--evaluate-checkpoint")

if __name__ == "__main__":
    sys.exit(main())
