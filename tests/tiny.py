"""The tiny training run many tests share: a conv net on 96 synthetic samples, two epochs of
three global steps of 32, masks 0.5 -> 0.2 with a mask update every 2 steps (the prune lands
at step 2, regrowth at 2 and 4)."""

from __future__ import annotations

from typing import Any

import torch

from granet_ray.config import GraNetConfig, TrainConfig
from granet_ray.recipe import Run

Tensors = dict[str, torch.Tensor]


def tiny_train(**changes: Any) -> TrainConfig:
    """The MNIST conv net on synthetic MNIST-shaped data, fp32, contiguous; ``changes``
    replace fields (e.g. ``model="resnet20", dataset="synthetic_cifar10"``)."""
    base: dict[str, Any] = {
        "model": "mnist_convnet",
        "dataset": "synthetic_mnist5k",
        "train_size": 96,
        "epochs": 2,
        "global_batch": 32,
        "lr": 0.05,
        "lr_milestones": (),
        "precision": "fp32",
        "channels_last": False,
        "granet": GraNetConfig(
            init_density=0.5, final_density=0.2, update_interval=2, prune_start=0, prune_end=1
        ),
    }
    base.update(changes)
    return TrainConfig(**base)


def weights(run: Run) -> Tensors:
    """Copies of the run's plain model state."""
    return {n: t.detach().clone() for n, t in run.net.state_dict().items()}
