"""A Ray Tune sweep over GraNet schedules: every trial a Ray Train run, ASHA early stopping
after the pruning window, a table, a Pareto plot of accuracy against sparsity and the best
preset per sparsity level.

    python jobs/tune_schedules.py                      # the paper's grid on MNIST-5k
    python jobs/tune_schedules.py --grid compare       # granet / gmp / rigl / set, 3 seeds
    python jobs/tune_schedules.py --grid my.yaml --final-density 0.1 0.05 --seeds 0 1
    ray job submit --working-dir . -- python jobs/tune_schedules.py --grid smoke

Running the same command again resumes an interrupted sweep (finished trials are not run
again) or, when it had finished, prints its results again. Results land in
``<storage>/<sweep>/results``. Every flag of ``granet-ray sweep`` applies.
"""

import sys

from granet_ray.cli import job

main = job("sweep")

if __name__ == "__main__":
    sys.exit(main())
