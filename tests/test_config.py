"""GoatConfig: defaults, validation messages, JSON round trip."""

from __future__ import annotations

import dataclasses

import pytest

from goat_hf import GoatConfig


def test_defaults_are_the_papers():
    config = GoatConfig()
    assert (config.r, config.num_experts, config.top_k) == (8, 8, 2)
    assert config.init == "goat" and config.scaling == "goat" and config.eta == 1.0 and config.rho == 10.0
    assert config.init_cof == 1 / 8  # c = 1/E
    assert config.expert_rank == 1
    assert config.aux_loss_coef == 1e-3
    assert config.target_modules == "all-linear" and config.modules_to_save is None


def test_init_cof_defaults_to_one_over_num_experts():
    assert GoatConfig(r=8, num_experts=4).init_cof == 0.25
    assert GoatConfig(r=8, num_experts=4, init_cof=0.5).init_cof == 0.5
    assert GoatConfig(r=8, num_experts=4, top_k=1).expert_rank == 2


def test_every_field_has_a_help_text():
    for field in dataclasses.fields(GoatConfig):
        assert field.metadata.get("help"), field.name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 12, "num_experts": 8}, r"r=12 is not a positive multiple of num_experts=8.*Valid ranks: 8, 16, 24, 32"),
        ({"r": 0, "num_experts": 1, "top_k": 1}, r"r=0 is not a positive multiple of num_experts=1"),
        ({"num_experts": 0, "top_k": 0}, r"num_experts=0 must be at least 1"),
        ({"r": 8, "num_experts": 2, "top_k": 3}, r"top_k=3 must be between 1 and num_experts=2"),
        ({"top_k": 0}, r"top_k=0 must be between 1 and num_experts=8"),
        ({"init": "svd"}, r"init='svd' is unknown; choose one of goat, goat_mini, pissa, milora, random, zero"),
        ({"scaling": "lora"}, r"scaling='lora' is unknown; choose one of goat, alpha, rslora, aligned or a positive"),
        ({"scaling": True}, r"scaling=True must be one of goat, alpha, rslora, aligned or a number"),
        ({"scaling": [1.0]}, r"scaling=\[1.0\] must be one of"),
        ({"scaling": 0}, r"scaling=0.* must be positive"),
        ({"scaling": "-1"}, r"scaling=-1.0 must be positive"),
        ({"lora_dropout": 1.0}, r"lora_dropout=1.0 must be in \[0, 1\)"),
        ({"lora_dropout": -0.1}, r"lora_dropout=-0.1 must be in \[0, 1\)"),
        ({"rho": 0}, r"rho=0 and eta=1.0 must both be positive"),
        ({"eta": -1}, r"rho=10.0 and eta=-1 must both be positive"),
        ({"svd_dtype": "float16"}, r"svd_dtype='float16' is unknown; choose 'float32' or 'float64'"),
        ({"aux_loss_coef": -1.0}, r"aux_loss_coef=-1.0 must be >= 0"),
    ],
    ids=[
        "r-not-multiple",
        "r-zero",
        "no-experts",
        "top-k-above-E",
        "top-k-zero",
        "unknown-init",
        "unknown-scaling",
        "bool-scaling",
        "list-scaling",
        "zero-scaling",
        "negative-scaling-string",
        "dropout-one",
        "dropout-negative",
        "rho",
        "eta",
        "svd-dtype",
        "aux-coef",
    ],
)
def test_bad_values_are_refused_with_a_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GoatConfig(**kwargs)


def test_scaling_accepts_numbers_and_numeric_strings():
    assert GoatConfig(scaling=2).scaling == 2.0 and isinstance(GoatConfig(scaling=2).scaling, float)
    assert GoatConfig(scaling="2.5").scaling == 2.5  # from a command line
    assert GoatConfig(scaling="rslora").scaling == "rslora"


def test_list_fields_are_copied():
    targets = ["q_proj", "v_proj"]
    config = GoatConfig(target_modules=targets, modules_to_save=("classifier",))
    targets.append("k_proj")
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.modules_to_save == ["classifier"]


@pytest.mark.parametrize(
    "config",
    [
        GoatConfig(),
        GoatConfig(r=32, num_experts=8, top_k=2, init="goat_mini", scaling=2.5, eta=0.1, lora_dropout=0.05),
        GoatConfig(
            r=4,
            num_experts=2,
            top_k=1,
            init="zero",
            scaling="alpha",
            lora_alpha=8,
            init_cof=0.3,
            target_modules=["q_proj", "v_proj"],
            modules_to_save=["score"],
            svd_dtype="float64",
            seed=5,
        ),
        GoatConfig(scaling="rslora", target_modules=r".*\.(q|v)_proj"),
    ],
    ids=["default", "float-scaling", "lists", "regex"],
)
def test_json_round_trip(tmp_path, config):
    path = tmp_path / "config.json"
    config.to_json_file(path)
    loaded = GoatConfig.from_json_file(path)
    assert loaded == config
    assert type(loaded.scaling) is type(config.scaling)
    assert GoatConfig.from_dict(config.to_dict()) == config


def test_unknown_fields_from_a_newer_version_are_refused():
    values = GoatConfig().to_dict() | {"shared_experts": 2}
    with pytest.raises(ValueError, match=r"unknown fields \['shared_experts'\].*newer goat_hf.*Upgrade goat_hf"):
        GoatConfig.from_dict(values)


def test_loaded_values_are_validated(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"r": 6, "num_experts": 4}')
    with pytest.raises(ValueError, match="r=6 is not a positive multiple of num_experts=4"):
        GoatConfig.from_json_file(path)
