"""Config validation (every invalid field raises ConfigError naming it), the paper's presets
(spec section 7) and the to_dict / from_dict round trip."""

from __future__ import annotations

import json
from typing import Any

import pytest

from granet_ray.config import PRESETS, ConfigError, GraNetConfig, TrainConfig, preset


def _train(**kw: Any) -> TrainConfig:
    """A valid small TrainConfig (its GraNet window fits in its epochs) with changes."""
    base: dict[str, Any] = {"epochs": 10, "granet": GraNetConfig(prune_end=5)}
    base.update(kw)
    return TrainConfig(**base)


# --- GraNetConfig --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("init_density", 0),
        ("init_density", 0.0),
        ("init_density", 1.5),
        ("init_density", -0.1),
        ("init_density", True),
        ("init_density", "0.5"),
        ("final_density", 0),
        ("final_density", 1.5),
        ("final_density", None),
        ("update_interval", 0),
        ("update_interval", -5),
        ("update_interval", 10.0),
        ("update_interval", True),
        ("method", "lottery"),
        ("method", "GraNet"),
        ("allocation", "er"),
        ("allocation", "ERK"),
        ("prune_start", -1),
        ("regrow_min", -0.1),
        ("regrow_min", 1.5),
        ("regrow_fraction", 1.5),
        ("regrow_fraction", 0.001),  # below regrow_min = 0.005
        ("regrow_end", 0),
        ("regrow_end", -3),
        ("seed", 1.5),
    ],
)
def test_granet_invalid_field_raises_naming_it(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}="):
        GraNetConfig(**{field: value})


@pytest.mark.parametrize("method", ["granet", "granet_uniform"])
def test_final_density_above_init_density_raises(method: str) -> None:
    with pytest.raises(ConfigError, match=r"^final_density="):
        GraNetConfig(method=method, init_density=0.3, final_density=0.5)
    GraNetConfig(method=method, init_density=0.5, final_density=0.5)  # equal is allowed


@pytest.mark.parametrize(("start", "end"), [(0, 0), (10, 10), (20, 10), (5, 4.9)])
def test_prune_end_not_after_prune_start_raises(start: float, end: float) -> None:
    with pytest.raises(ConfigError, match=r"^prune_end="):
        GraNetConfig(prune_start=start, prune_end=end)


def test_config_error_is_a_value_error_and_names_the_allowed_range() -> None:
    with pytest.raises(ValueError, match=r"final_density=1\.5 is invalid: must be .*\(0, 1\]"):
        GraNetConfig(final_density=1.5)


def test_method_properties() -> None:
    """Spec section 4: init density, prune / regrow and the prune scope of every method."""
    table = {
        # method: (start density, prunes, regrows, global prune, init allocation)
        "granet": (0.5, True, True, True, "erk"),
        "granet_uniform": (0.5, True, True, False, "uniform"),
        "gmp": (1.0, True, False, True, "erk"),
        "rigl": (0.1, False, True, True, "erk"),
        "set": (0.1, False, True, True, "erk"),
        "static": (0.1, False, False, True, "erk"),
    }
    for method, (start, prunes, regrows, global_, alloc) in table.items():
        c = GraNetConfig(method=method, init_density=0.5, final_density=0.1)
        assert c.start_density == start, method
        assert c.prunes is prunes, method
        assert c.regrows is regrows, method
        assert c.init_allocation == alloc, method
        if prunes:
            assert c.global_prune is global_, method


def test_granet_defaults_are_the_papers() -> None:
    c = GraNetConfig()
    assert (c.method, c.init_density, c.update_interval) == ("granet", 1.0, 1000)
    assert (c.regrow_fraction, c.regrow_min, c.allocation) == (0.5, 0.005, "erk")


def test_granet_from_dict_unknown_key_raises() -> None:
    with pytest.raises(ConfigError, match="densty"):
        GraNetConfig.from_dict({"densty": 0.1})
    assert GraNetConfig.from_dict({"final_density": 0.05}) == GraNetConfig(final_density=0.05)


# --- TrainConfig ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("epochs", -1),
        ("epochs", 2.5),
        ("batch_size", 0),
        ("optimizer", "lamb"),
        ("lr", 0),
        ("lr", float("inf")),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("lr_gamma", 0),
        ("lr_gamma", 1.5),
        ("lr_milestones", (5, 11)),  # beyond epochs = 10
        ("lr_milestones", (0,)),
        ("warmup_epochs", 10),
        ("label_smoothing", 1.0),
    ],
)
def test_train_invalid_field_raises_naming_it(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}="):
        _train(**{field: value})


def test_prune_end_beyond_epochs_raises_only_when_the_method_prunes() -> None:
    with pytest.raises(ConfigError, match=r"^granet\.prune_end="):
        _train(epochs=10, granet=GraNetConfig(prune_end=20))
    with pytest.raises(ConfigError, match=r"^granet\.prune_end="):
        _train(epochs=10, granet=GraNetConfig(method="gmp", prune_end=11))
    _train(epochs=10, granet=GraNetConfig(prune_end=10))  # the last epoch is fine
    _train(epochs=10, granet=GraNetConfig(method="rigl", prune_end=80))  # rigl never prunes


def test_train_from_dict_unknown_keys_raise() -> None:
    data = _train().to_dict()
    with pytest.raises(ConfigError, match="epoch"):
        TrainConfig.from_dict({**data, "epoch": 3})
    with pytest.raises(ConfigError, match="final_densty"):
        TrainConfig.from_dict({**data, "granet": {**data["granet"], "final_densty": 0.1}})


def test_to_dict_is_plain_json() -> None:
    cfg = _train(lr_milestones=(3, 6))
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert isinstance(data["granet"], dict)
    assert data["lr_milestones"] == [3, 6]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name: str) -> None:
    cfg = preset(name)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(data) == cfg


def test_small_config_round_trips() -> None:
    """A valid config with fewer epochs than the default GraNet window (prune_end = 80)."""
    cfg = TrainConfig(epochs=8, granet=GraNetConfig(prune_end=4, update_interval=20))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_train_config_defaults_are_valid() -> None:
    """TrainConfig() (and TrainConfig(epochs=...)) must be constructible."""
    cfg = TrainConfig()
    assert cfg.granet.prune_end <= cfg.epochs


def test_replace() -> None:
    cfg = preset("cifar10_resnet20")
    new = cfg.replace(lr=0.05, granet={"final_density": 0.05})
    assert new.lr == 0.05 and new.granet.final_density == 0.05
    assert new.granet.prune_end == cfg.granet.prune_end
    with pytest.raises(ConfigError, match=r"^granet\.prune_end="):
        cfg.replace(epochs=70, lr_milestones=(30, 60))


def test_unknown_preset_raises() -> None:
    with pytest.raises(ConfigError, match="preset"):
        preset("cifar100_resnet20")


# --- presets: spec section 7 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model"), [("cifar10_resnet20", "resnet20"), ("cifar10_vgg19", "vgg19_bn")]
)
def test_cifar_presets(name: str, model: str) -> None:
    c = preset(name)
    assert c.model == model and c.dataset == "cifar10"
    assert (c.epochs, c.batch_size, c.optimizer) == (160, 128, "sgd")
    assert (c.lr, c.momentum, c.nesterov, c.weight_decay) == (0.1, 0.9, True, 5e-4)
    assert (c.lr_milestones, c.lr_gamma, c.warmup_epochs) == ((80, 120), 0.1, 0.0)
    g = c.granet
    assert (g.method, g.update_interval, g.regrow_fraction, g.regrow_min) == (
        "granet",
        1000,
        0.5,
        0.005,
    )
    assert g.allocation == "erk"
    assert g.init_density in (1.0, 0.5) and g.final_density in (0.1, 0.05, 0.02)
    assert (g.prune_start, g.prune_end) == (0, 80)


def test_imagenet_preset() -> None:
    c = preset("imagenet_resnet50")
    assert (c.model, c.dataset) == ("resnet50", "imagenet")
    assert (c.epochs, c.batch_size, c.optimizer) == (100, 64, "sgd")  # 64 per GPU, 2 GPUs
    assert (c.lr, c.momentum, c.weight_decay) == (0.1, 0.9, 1e-4)
    assert c.weight_decay_norm is False  # no weight decay on norm layers
    assert (c.warmup_epochs, c.lr_milestones, c.lr_gamma) == (5, (30, 60, 90), 0.1)
    assert c.label_smoothing == 0.1
    g = c.granet
    assert (g.method, g.update_interval, g.prune_start, g.prune_end) == ("granet", 4000, 0, 30)
    assert g.init_density == 0.5 and g.final_density in (0.2, 0.1)
    assert (g.regrow_fraction, g.allocation) == (0.5, "erk")
