"""GoatSFTConfig (SFTConfig + the GOAT flags) and an instruction-tuning run: Alpaca prompts with a real tokenizer,
completion-only labels, the balance loss, an adapter-only save and identical generation after reloading."""

from __future__ import annotations

import pytest
import torch
from instruct_fixtures import smollm2_tokenizer, tiny_instruct_llama
from trainer_fixtures import adapter_copy, cpu_args, single_thread
from transformers import HfArgumentParser, TrainingArguments
from trl import SFTConfig

from goat_hf import GoatConfig, GoatTrainingArguments, goat_layers, load_goat_adapter
from goat_hf.sft_trainer import GoatSFTConfig, GoatSFTTrainer
from goat_hf.tasks.generation import generate_responses
from goat_hf.tasks.instruction_data import prompt_completion_dataset, record_prompt

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

RECORDS = [{"query": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}\n#### {a + b}"} for a, b in
           [(2, 3), (10, 7), (4, 4), (21, 9), (6, 15), (8, 1), (30, 12), (5, 5)]]  # fmt: skip


def test_goat_sft_config_parses_goat_and_sft_flags(tmp_path):
    parser = HfArgumentParser(GoatSFTConfig)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--bf16", "false", "--goat_r", "16", "--goat_num_experts", "4",
         "--goat_top_k", "1", "--goat_eta", "0.1", "--aux_loss_coef", "0.01", "--goat_target_modules", "q_proj",
         "v_proj", "--max_length", "256", "--completion_only_loss", "true", "--router_learning_rate", "1e-3"]
    )  # fmt: skip
    assert isinstance(args, SFTConfig) and isinstance(args, GoatTrainingArguments)
    assert args.to_goat_config() == GoatConfig(
        r=16, num_experts=4, top_k=1, eta=0.1, aux_loss_coef=0.01, target_modules=["q_proj", "v_proj"]
    )
    assert (args.max_length, args.completion_only_loss, args.router_learning_rate) == (256, True, 1e-3)
    assert args.learning_rate == 2e-5 != TrainingArguments.learning_rate  # SFTConfig's defaults win


def test_goat_sft_config_rejects_bad_goat_flags_when_built(tmp_path):
    with pytest.raises(ValueError, match="r=12 is not a positive multiple of num_experts=8"):
        GoatSFTConfig(output_dir=str(tmp_path), bf16=False, goat_r=12)


def test_instruction_tuning_end_to_end(tmp_path):
    tokenizer = smollm2_tokenizer()
    model = tiny_instruct_llama(tokenizer, seed=3)
    args = cpu_args(tmp_path / "run", GoatSFTConfig, bf16=False, goat_r=4, goat_num_experts=4, max_steps=3,
                    per_device_train_batch_size=4, learning_rate=1e-2)  # fmt: skip
    trainer = GoatSFTTrainer(
        model=model, args=args, train_dataset=prompt_completion_dataset(RECORDS), processing_class=tokenizer
    )
    assert model.goat_state.config == args.to_goat_config()  # injected from the GOAT flags

    for record, row in zip(RECORDS, trainer.train_dataset, strict=True):
        prompt = tokenizer(record_prompt(record))["input_ids"]  # what evaluation feeds the model
        n = len(prompt)
        assert row["input_ids"][:n] == prompt
        assert row["labels"][:n] == [-100] * n  # completion-only loss: the prompt is masked
        assert row["labels"][n:] == row["input_ids"][n:]
        assert tokenizer.decode(row["input_ids"][n:]) == record["response"] + tokenizer.eos_token

    initial = adapter_copy(model)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    term = args.aux_loss_coef * args.goat_top_k * len(goat_layers(model))  # the loss term over the logged aux_loss
    assert logs and all(entry["loss"] - entry["task_loss"] == pytest.approx(term * entry["aux_loss"], abs=2e-4)
                        for entry in logs)  # fmt: skip
    trained = adapter_copy(model)
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.expert_B"],
                           initial["model.layers.0.self_attn.q_proj.expert_B"])  # fmt: skip

    folder = tmp_path / "adapter"
    trainer.save_model(str(folder))
    assert {"goat_adapter.safetensors", "goat_config.json"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.glob("model*.safetensors")) and not (folder / "pytorch_model.bin").exists()

    prompts = [record_prompt(record) for record in RECORDS]
    expected = generate_responses(trainer.model, tokenizer, prompts, batch_size=4, max_new_tokens=8)
    fresh = load_goat_adapter(tiny_instruct_llama(tokenizer, seed=3), folder)
    assert generate_responses(fresh, tokenizer, prompts, batch_size=4, max_new_tokens=8) == expected
