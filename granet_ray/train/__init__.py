"""GraNet on Ray Train: the worker loop, the ``TorchTrainer`` builder and ``fit``.

The only package besides ``granet_ray.tune`` that imports Ray.
"""

from granet_ray.train.settings import RunSettings, default_storage_path
from granet_ray.train.trainer import FitOutcome, build_trainer, connect, fit
from granet_ray.train.worker import CrashAt, train_loop_per_worker

__all__ = [
    "CrashAt",
    "FitOutcome",
    "RunSettings",
    "build_trainer",
    "connect",
    "default_storage_path",
    "fit",
    "train_loop_per_worker",
]
