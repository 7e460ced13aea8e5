"""Config validation (every invalid field raises ConfigError naming it), the paper's presets
(docs/algorithm.md section 7) and the to_dict / from_dict round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tiny import small_train

from granet_ray.config import (
    METHODS,
    PRESETS,
    ConfigError,
    GraNetConfig,
    RunSettings,
    TrainConfig,
    changes,
    dump_preset,
    load_preset_file,
    preset,
    preset_file_name,
    rescale,
    with_epochs,
    with_global_batch,
)

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
        ("regrow_fraction", 0.001),  # below granet's p_min = 0.005
        ("regrow_end", 0),
        ("prune_scope", "per_layer"),
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
    assert (c.initial_fraction, c.min_fraction, c.allocation) == (0.5, 0.005, "erk")
    assert (c.regrow_fraction, c.regrow_min, c.regrow_end) == (None, None, None)


def test_rigl_and_set_defaults_are_the_rigl_papers() -> None:
    """Spec 4: drop fraction alpha = 0.3 annealed to 0 at T_end = 0.75 T; overridable."""
    for method in ("rigl", "set"):
        c = GraNetConfig(method=method)
        assert (c.initial_fraction, c.min_fraction) == (0.3, 0.0)
        assert (c.spec.regrow_end, c.spec.anneal) == (0.75, "end")
        custom = GraNetConfig(method=method, regrow_fraction=0.5, regrow_min=0.01, regrow_end=3)
        assert (custom.initial_fraction, custom.min_fraction, custom.regrow_end) == (0.5, 0.01, 3)


def test_methods_are_rows_of_one_table() -> None:
    assert set(METHODS) == {"granet", "granet_uniform", "gmp", "rigl", "set", "static"}
    for name, spec in METHODS.items():
        assert spec.name == name
        assert spec.start in ("init", "dense", "final")
        assert spec.prune in (None, "global", "layer")
        assert spec.regrow in (None, "gradient", "random")
        assert spec.anneal in ("total", "end")


def test_gmp_prunes_per_layer_on_request_and_only_pruning_methods_take_a_scope() -> None:
    assert GraNetConfig(method="gmp").global_prune
    assert not GraNetConfig(method="gmp", prune_scope="layer").global_prune
    assert GraNetConfig(method="granet_uniform", prune_scope="global").global_prune
    with pytest.raises(ConfigError, match="^prune_scope="):
        GraNetConfig(method="rigl", prune_scope="layer")


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
        ("global_batch", 0),
        ("global_batch", 12.5),
        ("max_batch_per_worker", 0),
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
        ("precision", "fp8"),
        ("seed", "0"),
    ],
)
def test_train_invalid_field_raises_naming_it(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}="):
        small_train(**{field: value})


def test_prune_end_beyond_epochs_raises_only_when_the_method_prunes() -> None:
    with pytest.raises(ConfigError, match=r"^granet\.prune_end="):
        small_train(epochs=10, granet=GraNetConfig(prune_end=20))
    with pytest.raises(ConfigError, match=r"^granet\.prune_end="):
        small_train(epochs=10, granet=GraNetConfig(method="gmp", prune_end=11))
    small_train(epochs=10, granet=GraNetConfig(prune_end=10))  # the last epoch is fine
    small_train(epochs=10, granet=GraNetConfig(method="rigl", prune_end=80))  # rigl never prunes


def test_train_from_dict_unknown_keys_raise() -> None:
    data = small_train().to_dict()
    with pytest.raises(ConfigError, match="epoch"):
        TrainConfig.from_dict({**data, "epoch": 3})
    with pytest.raises(ConfigError, match="final_densty"):
        TrainConfig.from_dict({**data, "granet": {**data["granet"], "final_densty": 0.1}})


def test_to_dict_is_plain_json() -> None:
    cfg = small_train(lr_milestones=(3, 6))
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


# --- presets: docs/algorithm.md section 7 ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model"), [("cifar10_resnet20", "resnet20"), ("cifar10_vgg19", "vgg19_bn")]
)
def test_cifar_presets(name: str, model: str) -> None:
    c = preset(name)
    assert c.model == model and c.dataset == "cifar10"
    assert (c.epochs, c.global_batch, c.optimizer) == (160, 128, "sgd")
    assert (c.lr, c.momentum, c.nesterov, c.weight_decay) == (0.1, 0.9, True, 5e-4)
    assert (c.lr_milestones, c.lr_gamma, c.warmup_epochs) == ((80, 120), 0.1, 0.0)
    g = c.granet
    assert (g.method, g.update_interval, g.initial_fraction, g.min_fraction) == (
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
    assert (c.epochs, c.global_batch, c.optimizer) == (100, 128, "sgd")  # the paper's 2 x 64
    assert (c.lr, c.momentum, c.weight_decay) == (0.1, 0.9, 1e-4)
    assert c.weight_decay_norm is False  # no weight decay on norm layers
    assert (c.warmup_epochs, c.lr_milestones, c.lr_gamma) == (5, (30, 60, 90), 0.1)
    assert c.label_smoothing == 0.1
    g = c.granet
    assert (g.method, g.update_interval, g.prune_start, g.prune_end) == ("granet", 4000, 0, 30)
    assert g.init_density == 0.5 and g.final_density in (0.2, 0.1)
    assert (g.initial_fraction, g.allocation) == (0.5, "erk")


# --- rescaling: --epochs and --global-batch ----------------------------------------------------


def test_with_epochs_scales_the_epoch_based_schedule() -> None:
    imagenet = preset("imagenet_resnet50")
    short = with_epochs(imagenet, 10)
    assert short.epochs == 10 and short.lr_milestones == (3, 6, 9)
    assert short.warmup_epochs == pytest.approx(0.5)
    assert short.granet.prune_end == pytest.approx(3.0)
    assert short.granet.update_interval == 400  # a shorter run keeps its number of updates
    assert with_epochs(imagenet, 100) is imagenet
    tiny = with_epochs(imagenet, 2)
    assert tiny.lr_milestones == (1, 2)  # 0.6, 1.2, 1.8 rounded within [1, 2], merged
    longer = with_epochs(preset("mnist_demo"), 16)
    assert longer.granet.update_interval == 20 and longer.granet.prune_end == 8
    assert with_epochs(preset("mnist_demo"), 1).granet.update_interval == 2  # 20 / 8, rounded
    with pytest.raises(ConfigError, match="^epochs=0 is invalid"):
        with_epochs(imagenet, 0)


def test_with_global_batch_scales_lr_linearly_and_the_interval_inversely() -> None:
    """Spec 5: another global batch B' scales the LR by B' / B (warm-up kept) and dT by
    B / B' (at least 1), so mask updates stay at the same points in epochs."""
    imagenet = preset("imagenet_resnet50")  # B = 128, lr 0.1, dT 4000
    big = with_global_batch(imagenet, 1024)
    assert (big.global_batch, big.lr, big.granet.update_interval) == (1024, 0.8, 500)
    assert big.warmup_epochs == imagenet.warmup_epochs
    small = with_global_batch(imagenet, 32)
    assert (small.lr, small.granet.update_interval) == (pytest.approx(0.025), 16000)
    assert with_global_batch(imagenet, 128) is imagenet
    assert with_global_batch(preset("mnist_demo"), 128 * 64).granet.update_interval == 1
    with pytest.raises(ConfigError, match="^global_batch=0 is invalid"):
        with_global_batch(imagenet, 0)


def test_rescale_applies_epochs_then_global_batch_and_changes_lists_them() -> None:
    demo = preset("mnist_demo")
    train = rescale(demo, epochs=4, global_batch=32)
    assert train == with_global_batch(with_epochs(demo, 4), 32)
    assert rescale(demo) is demo
    listed = changes(demo, train)
    assert "epochs: 8 -> 4" in listed and "global_batch: 128 -> 32" in listed
    assert "granet.update_interval: 20 -> 40" in listed and "lr: 0.05 -> 0.0125" in listed


# --- preset files --------------------------------------------------------------------------


def test_preset_files_round_trip_and_fail_naming_the_problem(tmp_path: Path) -> None:
    """A preset file is a TrainConfig as JSON (or YAML): what a sweep exports."""
    train = preset("cifar10_resnet20").replace(granet={"final_density": 0.05})
    (tmp_path / "bad.yaml").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON/YAML"):
        load_preset_file(tmp_path / "bad.yaml")
    assert preset_file_name(0.02) == "best-density-0.02.json"
    path = tmp_path / "p.json"
    path.write_bytes(dump_preset(train))
    assert load_preset_file(path) == train
    yaml_path = tmp_path / "p.yaml"
    yaml_path.write_text("granet: {method: gmp, final_density: 0.05, prune_end: 4}\n")
    assert load_preset_file(yaml_path).granet.method == "gmp"
    with pytest.raises(ConfigError, match="cannot be read"):
        load_preset_file(tmp_path / "missing.json")
    path.write_text(json.dumps({**train.to_dict(), "epochz": 3}))
    with pytest.raises(ConfigError, match=r"p.json: unknown train config field\(s\) epochz"):
        load_preset_file(path)
    path.write_text(json.dumps({"granet": {"final_density": 2}}))
    with pytest.raises(ConfigError, match="final_density=2 is invalid"):
        load_preset_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_preset_file(path)


# --- RunSettings ---------------------------------------------------------------------------

S3 = {"endpoint_url": "http://127.0.0.1:9000", "key": "AK", "secret": "SK"}


def test_run_settings_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("GRANET_RAY_STORAGE", raising=False)
    run = RunSettings()
    assert (run.num_workers, run.gpus_per_worker, run.cpus_per_worker) == (1, 0.0, 1.0)
    assert run.storage_path == str(Path("~/granet-ray/runs").expanduser())
    assert (run.name, run.checkpoint_every, run.max_failures) == (None, 1, 1)
    assert run.checkpoint_every_steps is None
    monkeypatch.setenv("GRANET_RAY_STORAGE", str(tmp_path))
    assert RunSettings().storage_path == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert RunSettings(storage_path="runs").storage_path == str(tmp_path / "runs")
    assert RunSettings.from_dict(run.to_dict()) == run
    assert RunSettings(storage_path="s3://b/p", name="r").run_uri == "s3://b/p/r"
    with pytest.raises(ValueError, match="no name"):
        _ = RunSettings().run_uri


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_workers": 0}, "num_workers"),
        ({"num_workers": 1.5}, "num_workers"),
        ({"gpus_per_worker": -0.5}, "gpus_per_worker"),
        ({"cpus_per_worker": 0}, "cpus_per_worker"),
        ({"storage_path": ""}, "storage_path"),
        ({"storage_path": "gs://bucket/x"}, "storage_path"),
        ({"storage_path": "s3://"}, "storage_path"),
        ({"storage_options": S3}, "storage_options"),  # options without s3://
        ({"storage_path": "s3://b/p", "storage_options": {"region": "x"}}, "storage_options"),
        ({"name": "a b"}, "name"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"checkpoint_every_steps": 0}, "checkpoint_every_steps"),
        ({"max_failures": -2}, "max_failures"),
    ],
)
def test_run_settings_reject_bad_values_naming_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{field}="):
        RunSettings(**changes)


def test_unknown_run_setting_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown run setting field.*gpus"):
        RunSettings.from_dict({"gpus": 1})
