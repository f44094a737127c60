"""GoatTrainingArguments: the GOAT flags on the command line, validated at parse time, and how they reach the
trainer (a plain TrainingArguments, `goat_config=` overrides, an already-injected model)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from trainer_fixtures import cpu_args, lm_dataset, single_thread
from transformers import HfArgumentParser

from goat_hf import GoatConfig, GoatTrainer, GoatTrainingArguments, get_goat_model, goat_layers

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def parse(tmp_path, command_line: str) -> GoatTrainingArguments:
    base = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    (args,) = HfArgumentParser(GoatTrainingArguments).parse_args_into_dataclasses(args=[*base, *command_line.split()])
    return args


def test_command_line_flags_build_the_goat_config(tmp_path):
    args = parse(
        tmp_path,
        "--goat_r 16 --goat_num_experts 4 --goat_top_k 1 --goat_init pissa --goat_scaling alpha --aux_loss_coef 0.01 "
        "--router_learning_rate 3e-4 --goat_target_modules q_proj v_proj --goat_modules_to_save score",
    )
    assert args.to_goat_config() == GoatConfig(
        r=16,
        num_experts=4,
        top_k=1,
        init="pissa",
        scaling="alpha",
        aux_loss_coef=0.01,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["score"],
    )
    assert args.router_learning_rate == 3e-4
    assert args.router_weight_decay == 0.0


@pytest.mark.parametrize(("flag", "scaling"), [("goat", "goat"), ("rslora", "rslora"), ("2.5", 2.5), ("3", 3.0)])
def test_scaling_flag_takes_a_mode_or_a_number(tmp_path, flag, scaling):
    assert parse(tmp_path, f"--goat_scaling {flag}").to_goat_config().scaling == scaling


def test_defaults_are_the_paper_defaults(tmp_path):
    args = cpu_args(tmp_path, GoatTrainingArguments)
    assert args.to_goat_config() == GoatConfig()
    assert args.to_goat_config().target_modules == "all-linear"
    assert args.router_learning_rate is None


def test_every_goat_config_field_is_a_flag_with_the_config_help():
    helps = {action.dest: action.help for action in HfArgumentParser(GoatTrainingArguments)._actions}
    for field in dataclasses.fields(GoatConfig):
        flag = field.name if field.name == "aux_loss_coef" else f"goat_{field.name}"
        assert helps[flag] == field.metadata["help"], flag


BAD_VALUES = {
    "rank-not-multiple": ("--goat_r 12", {"r": 12}),
    "top-k-too-large": ("--goat_top_k 9", {"top_k": 9}),
    "unknown-scaling": ("--goat_scaling huge", {"scaling": "huge"}),
    "negative-scaling": ("--goat_scaling -2", {"scaling": -2.0}),
    "negative-aux": ("--aux_loss_coef -1", {"aux_loss_coef": -1.0}),
    "dropout-one": ("--goat_lora_dropout 1", {"lora_dropout": 1.0}),
}


@pytest.mark.parametrize(("flags", "config_kwargs"), BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_fail_at_parse_time_with_the_goat_config_message(tmp_path, flags, config_kwargs):
    with pytest.raises(ValueError) as direct:
        GoatConfig(**config_kwargs)
    with pytest.raises(ValueError) as parsed:
        parse(tmp_path, flags)
    assert str(parsed.value) == str(direct.value)


def test_unknown_init_is_refused_by_the_parser_with_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(tmp_path, "--goat_init svd")
    assert "invalid choice: 'svd'" in capsys.readouterr().err


def test_bad_values_fail_when_built_in_python_too(tmp_path):
    with pytest.raises(ValueError, match="num_experts=4"):
        cpu_args(tmp_path, GoatTrainingArguments, goat_r=6, goat_num_experts=4)


def test_arguments_survive_pickling_as_in_checkpoints(tmp_path):
    args = cpu_args(tmp_path, GoatTrainingArguments, goat_r=16, aux_loss_coef=0.01, router_learning_rate=1e-4)
    restored = pickle.loads(pickle.dumps(args))
    assert type(restored) is GoatTrainingArguments
    assert restored.to_goat_config() == args.to_goat_config() and restored.router_learning_rate == 1e-4


# ---- how the arguments reach the trainer ----


def test_trainer_injects_the_config_of_the_goat_flags(llama_factory, tmp_path):
    model = llama_factory()
    args = cpu_args(
        tmp_path,
        GoatTrainingArguments,
        goat_r=16,
        goat_num_experts=4,
        goat_top_k=1,
        aux_loss_coef=0.01,
        goat_target_modules=["q_proj", "v_proj"],
    )
    trainer = GoatTrainer(model=model, args=args, train_dataset=lm_dataset())
    assert model.goat_state.config == args.to_goat_config()
    assert trainer.aux_loss_coef == 0.01
    assert sorted({name.rsplit(".", 1)[-1] for name in goat_layers(model)}) == ["q_proj", "v_proj"]
    assert {layer.expert_rank for layer in goat_layers(model).values()} == {4}


def test_goat_config_argument_overrides_the_flags(llama_factory, tmp_path):
    model = llama_factory()
    config = GoatConfig(r=4, num_experts=2, top_k=1, aux_loss_coef=0.2)
    args = cpu_args(tmp_path, GoatTrainingArguments, goat_r=16, goat_num_experts=4, aux_loss_coef=0.01)
    trainer = GoatTrainer(model=model, args=args, train_dataset=lm_dataset(), goat_config=config)
    assert model.goat_state.config == config
    assert trainer.aux_loss_coef == 0.2


def test_plain_training_arguments_inject_the_paper_defaults(llama_factory, tmp_path):
    model = llama_factory()
    trainer = GoatTrainer(model=model, args=cpu_args(tmp_path), train_dataset=lm_dataset())
    assert model.goat_state.config == GoatConfig()
    assert trainer.aux_loss_coef == GoatConfig().aux_loss_coef


def test_an_injected_model_keeps_its_layers_and_refuses_another_config(llama_factory, tmp_path):
    config = GoatConfig(r=8, num_experts=4, aux_loss_coef=0.05)
    model = get_goat_model(llama_factory(), config)
    layers = goat_layers(model)

    trainer = GoatTrainer(model=model, args=cpu_args(tmp_path), train_dataset=lm_dataset(), goat_config=config)
    assert goat_layers(model) == layers and trainer.aux_loss_coef == 0.05  # same layers, not injected twice

    with pytest.raises(ValueError, match="already has GOAT layers with another GoatConfig"):
        GoatTrainer(
            model=model,
            args=cpu_args(tmp_path),
            train_dataset=lm_dataset(),
            goat_config=GoatConfig(r=16, num_experts=4),
        )
