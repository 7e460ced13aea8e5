"""GraNet on Ray Train: the worker loop, the ``TorchTrainer`` builder and ``fit``, and the
API for your own training loop (``prepare_engine``, ``report``, ``restore``).

With ``granet_ray.tune``, the only package that imports Ray.
"""

from granet_ray.train.loop import prepare_engine, report, restore
from granet_ray.train.trainer import build_trainer, connect, fit
from granet_ray.train.worker import train_loop_per_worker

__all__ = [
    "build_trainer",
    "connect",
    "fit",
    "prepare_engine",
    "report",
    "restore",
    "train_loop_per_worker",
]
