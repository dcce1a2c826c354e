"""Config: round trips, overrides, and every bad-input message (field, value, allowed)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainables.config import ConfigError, DataConfig, OptimConfig, TrialConfig


def test_defaults_flatten_and_rebuild() -> None:
    cfg = TrialConfig()
    flat = cfg.to_flat()
    assert flat["optim.lr"] == cfg.optim.lr
    assert flat["model.channels"] == list(cfg.model.channels)
    assert all("." in k for k in flat)
    assert TrialConfig.from_flat(flat) == cfg
    assert TrialConfig.from_dict(cfg.to_nested()) == cfg


@given(lr=st.floats(1e-6, 10.0), batch=st.integers(1, 4096),
       widths=st.lists(st.integers(1, 512), min_size=1, max_size=4), nesterov=st.booleans())
def test_flat_round_trip_property(lr: float, batch: int, widths: list[int],
                                  nesterov: bool) -> None:
    cfg = TrialConfig().replace({"optim.lr": lr, "data.batch_size": batch,
                                 "model.widths": widths, "optim.nesterov": nesterov})
    assert TrialConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.model.widths == tuple(widths)


def test_overrides_parse_yaml_values() -> None:
    cfg = TrialConfig().with_overrides(
        ["optim.lr=0.1", "model.channels=[8, 16]", "optim.nesterov=false",
         "optim.momentum=0", "data.name=cifar10", "train.epochs=3"])
    assert cfg.optim.lr == 0.1 and cfg.model.channels == (8, 16)
    assert cfg.optim.nesterov is False and cfg.optim.momentum == 0.0
    assert cfg.data.name == "cifar10" and cfg.train.epochs == 3


def test_ints_are_accepted_for_floats_and_integral_floats_for_ints() -> None:
    cfg = TrialConfig().replace({"optim.lr": 1, "train.epochs": 4.0})
    assert isinstance(cfg.optim.lr, float) and cfg.train.epochs == 4


def test_exponent_without_dot_is_a_number() -> None:
    # YAML 1.1 would read 5e-4 as a string.
    cfg = TrialConfig().with_overrides(["optim.weight_decay=5e-4", "data.batch_size=1e2"])
    assert cfg.optim.weight_decay == 5e-4 and cfg.data.batch_size == 100


def test_yaml_file_nested_or_dotted(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.2\nmodel.name: mlp\n")
    cfg = TrialConfig.from_yaml(path)
    assert cfg.optim.lr == 0.2 and cfg.model.name == "mlp"
    assert TrialConfig.from_yaml(tmp_path / "c.yaml").to_yaml() == cfg.to_yaml()


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrialConfig().optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=-1", ["optim.lr", "-1", "> 0"]),
    ("optim.lr=0", ["optim.lr", "> 0"]),
    ("optim.lr=.nan", ["optim.lr", "nan"]),
    ("optim.momentum=1.0", ["optim.momentum", "< 1"]),
    ("optim.weight_decay=-0.1", ["optim.weight_decay", ">= 0"]),
    ("optim.schedule=linear", ["optim.schedule", "'linear'", "onecycle", "cosine"]),
    ("optim.name=adamw", ["optim.name", "'adamw'", "sgd"]),
    ("optim.gamma=0", ["optim.gamma", "> 0"]),
    (("optim.name=adam_gd", "optim.beta1=1"), ["optim.beta1", "< 1"]),
    (("optim.name=adam_eg", "optim.eps=0"), ["optim.eps", "> 0"]),
    (("optim.name=lns_madam", "optim.lns_bits=1"), ["optim.lns_bits", ">= 2", "<= 16"]),
    (("optim.name=lns_madam", "optim.lns_frac_bits=11"), ["optim.lns_frac_bits", "<= 10"]),
    (("optim.name=egpm", "optim.egpm_offset=0"), ["optim.egpm_offset", "> 0"]),
    (("optim.name=eg", "optim.bias_lr=-0.1"), ["optim.bias_lr", ">= 0"]),
    (("optim.name=egpm", "optim.egpm_normalize=2"), ["optim.egpm_normalize", "true or false"]),
    ("data.name=imagenet", ["data.name", "'imagenet'", "mnist", "cifar100"]),
    ("data.batch_size=0", ["data.batch_size", ">= 1"]),
    ("data.batch_size=abc", ["data.batch_size", "'abc'", "integer"]),
    ("data.batch_size=1.5", ["data.batch_size", "1.5", "integer"]),
    ("data.val_fraction=0.5", ["data.val_fraction", "< 0.5"]),
    ("data.augment=mixup", ["data.augment", "crop_flip"]),
    ("data.name=image_folder", ["data.folder", "image_folder"]),
    ("model.name=vgg", ["model.name", "'vgg'", "resnet20", "mobilenet_v3_small"]),
    ("model.widths=[]", ["model.widths", "non-empty"]),
    ("model.widths=[64, 0]", ["model.widths", "positive"]),
    ("model.channels=[8]", ["model.channels", "two"]),
    ("model.kernel_size=7", ["model.kernel_size", "3 or 5"]),
    ("model.batch_norm=yes please", ["model.batch_norm", "true or false"]),
    ("model.dropout=1", ["model.dropout", "< 1"]),
    ("precision.mode=fp8", ["precision.mode", "'fp8'", "amp_bf16", "amp_fp16"]),
    ("train.epochs=0", ["train.epochs", ">= 1"]),
    ("train.seed=true", ["train.seed", "integer"]),
    ("train.num_workers=0", ["train.num_workers", ">= 1"]),
    ("train.cpus_per_worker=0", ["train.cpus_per_worker", "> 0"]),
    ("train.device=tpu", ["train.device", "'tpu'", "cuda"]),
    ("train.device=cuda", ["train.device", "use_gpu"]),
    ("optim.foo=1", ["optim.foo", "weight_decay", "lr"]),
    ("opt.lr=1", ["'opt'", "data, model, optim, precision, train, evaluate"]),
    # A field the chosen optimizer does not read: its name and the optimizers that read it.
    (("optim.name=eg", "optim.lns_bits=4"), ["optim.lns_bits", "lns_madam", "eg reads"]),
    ("optim.beta2=0.9", ["optim.beta2", "adam_gd", "madam", "sgd reads"]),
    (("optim.name=gd", "optim.momentum=0.5"), ["optim.momentum", "sgd", "gd reads optim.lr"]),
    ("nodots=1", ["'nodots'", "allowed sections"]),
])
def test_bad_values_name_field_value_and_allowed(override: str | tuple[str, ...],
                                                 expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        TrialConfig().with_overrides([override] if isinstance(override, str) else override)
    for fragment in expected:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_nesterov_needs_momentum() -> None:
    # sgd's nesterov defaults to true: momentum 0 alone is what breaks it.
    with pytest.raises(ConfigError, match="optim.momentum=0.0.*nesterov.*momentum > 0"):
        OptimConfig(momentum=0.0, nesterov=True)
    with pytest.raises(ConfigError, match="optim.momentum=0.0.*nesterov"):
        OptimConfig(momentum=0.0)
    assert OptimConfig(momentum=0.0, nesterov=False).read_fields()["momentum"] == 0.0


def test_unset_hyperparameters_take_the_optimizers_defaults() -> None:
    cfg = TrialConfig().with_overrides(["optim.name=lns_madam", "optim.lns_bits=6"])
    params = cfg.tracked_params()
    assert params["optim.lns_bits"] == 6 and params["optim.lns_frac_bits"] == 3
    assert params["optim.bias_lr"] == cfg.optim.lr  # unset: the weights' lr
    assert not {"optim.momentum", "optim.beta1", "optim.eps", "optim.step_epochs"} & set(params)
    assert TrialConfig().tracked_params()["optim.momentum"] == 0.9  # sgd's default
    assert TrialConfig.from_flat(cfg.to_flat()) == cfg  # unset fields survive the trip


def test_direct_construction_validates() -> None:
    with pytest.raises(ConfigError, match="data.test_batch_size"):
        DataConfig(test_batch_size=-5)
    with pytest.raises(ConfigError, match="data.name"):
        DataConfig(name=3)  # type: ignore[arg-type]


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        TrialConfig().with_overrides(["optim.lr"])
    with pytest.raises(ConfigError, match="key=value"):
        TrialConfig().with_overrides(["=3"])


def test_yaml_that_is_not_a_mapping(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        TrialConfig.from_yaml(path)


def test_a_config_saved_before_unset_fields_loads() -> None:
    # An older qsweep saved every optim field, read or not (eg with Adam's betas, bias_lr 0).
    old = {"optim.name": "eg", "optim.lr": 2.0, "optim.momentum": 0.0, "optim.nesterov": False,
           "optim.beta1": 0.9, "optim.lns_bits": 8, "optim.bias_lr": 0.0, "train.epochs": 3}
    with pytest.raises(ConfigError, match="optim.beta1"):
        TrialConfig.from_flat(old)
    cfg = TrialConfig.from_stored(old)
    assert cfg.optim.momentum == 0.0 and cfg.optim.beta1 is None and cfg.optim.bias_lr is None
    assert cfg.train.epochs == 3


def test_seed_forms_and_bias_mode_are_config_fields() -> None:
    cfg = TrialConfig().with_overrides(["optim.name=eg", "optim.decay_form=l2",
                                        "optim.bias_mode=all"])
    params = cfg.tracked_params()
    assert params["optim.decay_form"] == "l2" and params["optim.bias_mode"] == "all"
    assert "optim.bias_lr" not in params  # every parameter takes optim.lr
    assert TrialConfig().with_overrides(["optim.name=adam_eg"]).tracked_params()[
        "optim.decay_form"] == "decoupled"
    assert "optim.bias_mode" not in TrialConfig().tracked_params()  # sgd has no bias group
    with pytest.raises(ConfigError, match="optim.decay_form='l1' is invalid for optim.name=eg"
                                          ".*sign, l2"):
        TrialConfig().with_overrides(["optim.name=eg", "optim.decay_form=l1"])
    with pytest.raises(ConfigError, match="optim.bias_mode='none' is invalid: allowed one of "
                                          "split, all"):
        TrialConfig().with_overrides(["optim.name=eg", "optim.bias_mode=none"])
    with pytest.raises(ConfigError, match="optim.bias_lr=0.01 is invalid: allowed unset with "
                                          "optim.bias_mode=all"):
        TrialConfig().with_overrides(["optim.name=eg", "optim.bias_mode=all",
                                      "optim.bias_lr=0.01"])
    with pytest.raises(ConfigError, match="optim.sign_threshold.*gd_sign"):
        TrialConfig().with_overrides(["optim.name=gd", "optim.sign_threshold=1e-9"])


def test_a_config_saved_before_decay_forms_keeps_its_decay() -> None:
    # Before decay_form existed, eg decayed by L2 and adam_eg by exp(-lr * wd).
    for name, form in (("eg", "l2"), ("adam_eg", "exp")):
        old = {"optim.name": name, "optim.lr": 0.1, "optim.weight_decay": 1e-4}
        assert TrialConfig.from_stored(old).optim.decay_form == form
    new = TrialConfig().with_overrides(["optim.name=eg", "optim.lr=0.5"]).to_flat()
    assert TrialConfig.from_stored(new).optim.decay_form is None  # the default: sign
