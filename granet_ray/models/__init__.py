"""Model builders by name: ``build_model("resnet32")``, a user's factory by reference
(``build_model("mypkg.nets:small_vit", num_classes=10)``) or a timm model
(``build_model("timm:vit_tiny_patch16_224")``, with the ``timm`` extra)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from granet_ray.models.cifar_resnet import CifarResNet, resnet20, resnet32
from granet_ray.models.mnist import MnistConvNet
from granet_ray.models.vgg import VGG19BN
from granet_ray.reference import call_factory, invalid, is_reference, load_reference


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
TIMM_PREFIX = "timm:"
# Classes of a model built by reference when the caller gives none.
DEFAULT_CLASSES = 10
TIMM_MISSING = "timm is not installed: pip install 'granet-ray[timm]'"


def _timm() -> object:
    try:
        import timm
    except ImportError:
        return None
    return timm


def check_model_name(name: str) -> None:
    """``ConfigError`` naming ``model`` unless ``name`` is a built-in name, a ``timm:<name>``
    that the installed timm knows, or a ``pkg.module:factory`` that imports to a callable.
    Builds nothing."""
    if name in _REGISTRY:
        return
    if not is_reference(name):
        raise invalid(
            "model",
            name,
            f"must be one of {', '.join(MODEL_NAMES)}, timm:<name> or pkg.module:factory",
        )
    if name.startswith(TIMM_PREFIX):
        timm = _timm()
        if timm is None:
            raise invalid("model", name, TIMM_MISSING)
        if not timm.is_model(name.removeprefix(TIMM_PREFIX)):  # type: ignore[attr-defined]
            raise invalid("model", name, "timm has no such model (timm.list_models() names them)")
        return
    load_reference("model", name)


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """Build the model ``name``, freshly initialised: one of ``MODEL_NAMES``, ``timm:<name>``
    (``timm.create_model(name, pretrained=False, num_classes=N)``: nothing is downloaded) or
    ``pkg.module:factory`` (called as ``factory(num_classes=N)``, returning an
    ``nn.Module``).

    ``num_classes`` defaults to 10 for the CIFAR and MNIST models and references, 1000 for
    resnet50. A bad name or reference raises ``ConfigError`` naming ``model``.
    """
    check_model_name(name)
    factory, default_classes = _REGISTRY.get(name, (None, DEFAULT_CLASSES))
    if num_classes is None:
        num_classes = default_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if factory is not None:
        return factory(num_classes)
    if name.startswith(TIMM_PREFIX):
        timm = _timm()
        model = call_factory(
            "model",
            name,
            timm.create_model,  # type: ignore[attr-defined]
            model_name=name.removeprefix(TIMM_PREFIX),
            pretrained=False,
            num_classes=num_classes,
        )
    else:
        model = call_factory("model", name, load_reference("model", name), num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise invalid(
            "model", name, f"the factory returned a {type(model).__name__}, not a torch nn.Module"
        )
    return model


__all__ = [
    "MODEL_NAMES",
    "VGG19BN",
    "CifarResNet",
    "MnistConvNet",
    "build_model",
    "check_model_name",
    "resnet20",
    "resnet32",
]
