"""GoatConfig refuses wrong types and non-finite numbers with the field's name, in Python and on the command line."""

from __future__ import annotations

import math

import pytest
from transformers import HfArgumentParser

from goat_hf import GoatConfig, GoatTrainingArguments

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field", ["eta", "rho", "lora_alpha", "init_cof", "aux_loss_coef", "lora_dropout"])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_with_the_field_name(field, value):
    with pytest.raises(ValueError, match=rf"^{field}={value} is not a finite number; use e\.g\. {field}="):
        GoatConfig(**{field: value})


@pytest.mark.parametrize("value", [NAN, INF, "nan", "inf", "-inf"])
def test_non_finite_fixed_scaling_is_refused(value):
    with pytest.raises(ValueError, match=r"scaling=(nan|inf|-inf) is not a finite number; use e\.g\. scaling=2\.0"):
        GoatConfig(scaling=value)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"r": 8.0}, TypeError, r"r=8\.0 must be an int, e\.g\. r=8\."),
        ({"top_k": 1.5}, TypeError, r"top_k=1\.5 must be an int, e\.g\. top_k=2\."),
        ({"r": "8"}, TypeError, r"r='8' must be an int, e\.g\. r=8\."),
        ({"num_experts": True}, TypeError, r"num_experts=True must be an int"),
        ({"target_modules": None}, TypeError, r"target_modules=None must be 'all-linear', a regex or a non-empty list"),
        ({"target_modules": 42}, TypeError, r"target_modules=42 must be 'all-linear', a regex or a non-empty list"),
        ({"target_modules": []}, TypeError, r"target_modules=\[\] must be 'all-linear'"),
        ({"target_modules": "(["}, ValueError, r"target_modules='\(\[' is not a valid regular expression"),
        ({"scaling": "alpha", "lora_alpha": -16}, ValueError, r"lora_alpha=-16 must be positive with scaling='alpha'"),
        ({"scaling": "rslora", "lora_alpha": 0}, ValueError, r"lora_alpha=0 must be positive with scaling='rslora'"),
        ({"modules_to_save": 3}, TypeError, r"modules_to_save=3 must be None, a module name or a list of names"),
        ({"eta": "0.1"}, TypeError, r"eta='0\.1' must be a number, e\.g\. eta=1\.0\."),
        ({"seed": None}, TypeError, r"seed=None must be an int"),
    ],
    ids=[
        "r-float",
        "top-k-float",
        "r-string",
        "experts-bool",
        "targets-none",
        "targets-int",
        "targets-empty",
        "targets-bad-regex",
        "alpha-negative",
        "rslora-zero",
        "heads-int",
        "eta-string",
        "seed-none",
    ],
)
def test_wrong_types_are_refused_naming_the_field_and_the_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        GoatConfig(**kwargs)


def test_a_string_modules_to_save_is_one_module_name():
    assert GoatConfig(modules_to_save="classifier").modules_to_save == ["classifier"]
    assert GoatConfig(modules_to_save=[]).modules_to_save == []  # train no module in full
    assert GoatConfig(scaling="goat", lora_alpha=-1).lora_alpha == -1  # alpha only matters to its scalings


def test_saved_json_never_holds_a_bare_nan(tmp_path):
    path = tmp_path / "config.json"
    GoatConfig(eta=0.1).to_json_file(path)
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    path.write_text(path.read_text().replace('"eta": 0.1', '"eta": NaN'))
    with pytest.raises(ValueError, match="eta=nan is not a finite number"):
        GoatConfig.from_json_file(path)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--goat_eta", "nan", "eta=nan is not a finite number"),
        ("--goat_rho", "inf", "rho=inf is not a finite number"),
        ("--goat_scaling", "nan", "scaling=nan is not a finite number"),
        ("--aux_loss_coef", "-inf", "aux_loss_coef=-inf is not a finite number"),
        ("--on_nonfinite", "ignore", "invalid choice: 'ignore'"),
    ],
)
def test_command_line_refuses_non_finite_values(tmp_path, flag, value, message, capsys):
    parser = HfArgumentParser(GoatTrainingArguments)
    with pytest.raises((ValueError, SystemExit)) as caught:
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), f"{flag}={value}"])
    assert message in (str(caught.value) + capsys.readouterr().err)


def test_on_nonfinite_is_a_training_flag(tmp_path):
    parser = HfArgumentParser(GoatTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--on_nonfinite", "skip"])
    assert args.on_nonfinite == "skip"
    assert "on_nonfinite" not in GoatConfig().to_dict()  # it belongs to training, not to the adapter
    with pytest.raises(ValueError, match=r"on_nonfinite='ignore' is unknown; choose 'stop' \(raise\) or 'skip'"):
        GoatTrainingArguments(output_dir=str(tmp_path), on_nonfinite="ignore")
    assert math.isfinite(GoatTrainingArguments(output_dir=str(tmp_path)).goat_eta)
