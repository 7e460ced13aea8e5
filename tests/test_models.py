"""Model registry: shapes, parameter counts, num_classes, no downloads."""

from __future__ import annotations

import socket

import pytest
import torch
from torch import nn

from granet_ray.models import MODEL_NAMES, build_model

INPUT_SHAPES = {
    "resnet20": (3, 32, 32),
    "resnet32": (3, 32, 32),
    "vgg19_bn": (3, 32, 32),
    "resnet50": (3, 224, 224),
    "mnist_convnet": (1, 28, 28),
}
DEFAULT_CLASSES = {"resnet50": 1000}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _n_weight_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Fail any attempt to open a network connection or write to the torch hub cache."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model builder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def test_registry_lists_every_model() -> None:
    assert set(MODEL_NAMES) == set(INPUT_SHAPES)


@pytest.mark.parametrize("name", sorted(INPUT_SHAPES))
def test_forward_shape_default_classes(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *INPUT_SHAPES[name]))
    assert out.shape == (2, DEFAULT_CLASSES.get(name, 10))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(INPUT_SHAPES))
def test_num_classes_honoured(name: str) -> None:
    shape = (3, 64, 64) if name == "resnet50" else INPUT_SHAPES[name]  # global pool: any size
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "low", "high", "layers"),
    [("resnet20", 0.26e6, 0.28e6, 20), ("resnet32", 0.45e6, 0.47e6, 32)],
)
def test_cifar_resnet_size(name: str, low: float, high: float, layers: int) -> None:
    """He et al. 2016, Table 6: 0.27M and 0.46M parameters; option-A shortcuts add no layers."""
    model = build_model(name)
    assert low <= _n_params(model) <= high
    assert _n_weight_layers(model) == layers


def test_vgg19_bn_layout() -> None:
    model = build_model("vgg19_bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 16 and len(linears) == 1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 16
    assert [c.out_channels for c in convs] == [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8
    assert linears[0].in_features == 512
    assert 19.9e6 <= _n_params(model) <= 20.1e6


def test_resnet50_builds_without_download(tmp_path) -> None:
    model = build_model("resnet50")
    assert 25.5e6 <= _n_params(model) <= 25.6e6
    assert model.fc.out_features == 1000
    assert not (tmp_path / "torch_home").exists()


def test_kaiming_init_of_cifar_resnet() -> None:
    """Conv weights follow He et al. 2015: std = sqrt(2 / fan_in)."""
    torch.manual_seed(0)
    conv = build_model("resnet32").layer3[0].conv2
    fan_in = conv.in_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.05)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="model='resnet18' is invalid: .*resnet20.*mnist_convnet"):
        build_model("resnet18")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_classes(bad: object) -> None:
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        build_model("resnet20", num_classes=bad)  # type: ignore[arg-type]
