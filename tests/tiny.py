"""The test configs and the one-thread fixture tests run under. ``small_train``: a valid
TrainConfig for tests that only read one. ``tiny_train``: the tiny training run many tests
share, a conv net on 96 synthetic samples, two epochs of three global steps of 32, masks
0.5 -> 0.2 with a mask update every 2 steps (the prune lands at step 2, regrowth at 2 and 4)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from granet_ray.config import GraNetConfig, TrainConfig
from granet_ray.recipe import Run

Tensors = dict[str, torch.Tensor]


def small_train(**changes: Any) -> TrainConfig:
    """The defaults (the MNIST-5k demo) over 10 epochs with the GraNet window ending at epoch
    5: valid, with room for milestones and warm-up; ``changes`` replace fields."""
    return TrainConfig(**{"epochs": 10, "granet": GraNetConfig(prune_end=5), **changes})


def tiny_train(**changes: Any) -> TrainConfig:
    """The MNIST conv net on synthetic MNIST-shaped data, fp32, contiguous; ``changes``
    replace fields (e.g. ``model="resnet20", dataset="synthetic_cifar10"``)."""
    tiny: dict[str, Any] = {
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
    return small_train(**{**tiny, **changes})


def weights(run: Run) -> Tensors:
    """Copies of the run's plain model state."""
    return {n: t.detach().clone() for n, t in run.net.state_dict().items()}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest (and identically) on one intra-op thread on a shared 2-core
    box: ``pytestmark = pytest.mark.usefixtures("one_thread")`` in a test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
