"""Model builders by name: ``build_model("resnet32")``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from granet_ray.models.cifar_resnet import CifarResNet, resnet20, resnet32
from granet_ray.models.mnist import MnistConvNet
from granet_ray.models.vgg import VGG19BN


def _resnet50(num_classes: int) -> nn.Module:
    """torchvision ResNet-50, randomly initialised (never downloads weights)."""
    # Imported here: torchvision adds about 1.5 s to import time, needed only for this model.
    from torchvision.models import resnet50

    return resnet50(weights=None, num_classes=num_classes)


# name -> (factory taking num_classes, default num_classes)
_REGISTRY: dict[str, tuple[Callable[[int], nn.Module], int]] = {
    "resnet20": (resnet20, 10),
    "resnet32": (resnet32, 10),
    "vgg19_bn": (VGG19BN, 10),
    "resnet50": (_resnet50, 1000),
    "mnist_convnet": (MnistConvNet, 10),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Build the model ``name`` (one of ``MODEL_NAMES``), freshly initialised.

    ``num_classes`` defaults to 10 for the CIFAR and MNIST models and 1000 for resnet50.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    factory, default_classes = _REGISTRY[name]
    if num_classes is None:
        num_classes = default_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return factory(num_classes)


__all__ = [
    "MODEL_NAMES",
    "VGG19BN",
    "CifarResNet",
    "MnistConvNet",
    "build_model",
    "resnet20",
    "resnet32",
]
