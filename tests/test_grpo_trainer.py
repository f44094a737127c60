"""GoatGRPOTrainer (TRL, transformers' generate): the balance loss on the policy, the KL reference from the base model
bit for bit with no second copy, adapter-only checkpoints, and clear errors for bad rewards and settings."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import train_like_
from datasets import Dataset
from instruct_fixtures import smollm2_tokenizer, tiny_instruct_llama
from trainer_fixtures import (
    adapter_copy,
    assert_adapter_folder,
    balance_losses,
    cpu_args,
    max_difference,
    record_training_inputs,
    sgd_args,
    sgd_reference_step,
    single_thread,
    trainable_copy,
    training_logs,
)
from trl.trainer.utils import add_fused_lm_head

from goat_hf import goat_layers
from goat_hf.grpo_trainer import GoatGRPOConfig, GoatGRPOTrainer
from goat_hf.reference import GoatReferenceModel

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

PROBLEMS = Dataset.from_list([{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(8)])


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def length_reward(prompts, completions, **kwargs):
    return [len(completion) / 10 for completion in completions]


def grpo_args(output_dir, **overrides) -> GoatGRPOConfig:
    settings = dict(
        bf16=False, goat_r=8, goat_num_experts=4, learning_rate=1e-2, per_device_train_batch_size=4,
        num_generations=4, max_completion_length=6, beta=0.1,
    )  # fmt: skip
    settings.update(overrides)
    return cpu_args(output_dir, GoatGRPOConfig, **settings)


def test_grpo_trains_the_adapter_with_the_balance_loss_and_saves_it_alone(tokenizer, tmp_path):
    model = tiny_instruct_llama(tokenizer, seed=3)
    args = grpo_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = GoatGRPOTrainer(model, length_reward, args=args, train_dataset=PROBLEMS, processing_class=tokenizer)
    assert isinstance(trainer.ref_model, GoatReferenceModel) and trainer.reference_mode == "base"
    assert trainer.beta == args.beta == 0.1  # set back after TRL's init, which saw 0 and loaded no copy
    initial = adapter_copy(model)
    trainer.train()
    assert max_difference(adapter_copy(model), initial) > 1e-4
    logs = training_logs(trainer)
    term = args.aux_loss_coef * args.goat_top_k * len(goat_layers(model))
    assert all(
        entry["loss"] - entry["task_loss"] == pytest.approx(term * entry["aux_loss"], abs=2e-4) for entry in logs
    )
    assert all(entry["aux_loss"] > 0.5 and "kl" in entry for entry in logs)
    assert_adapter_folder(tmp_path / "checkpoint-2", model)
    card = (tmp_path / "checkpoint-2" / "README.md").read_text()
    assert "| method | GRPO |" in card and "| reference model | the base model (GOAT switched off" in card


def test_the_kl_reference_is_the_base_model_bit_for_bit(tokenizer, tmp_path):
    model = tiny_instruct_llama(tokenizer, seed=3)
    trainer = GoatGRPOTrainer(
        model, length_reward, args=grpo_args(tmp_path), train_dataset=PROBLEMS, processing_class=tokenizer
    )
    assert not list(trainer.ref_model.parameters())  # no second copy of the model
    train_like_(model, std=0.3)
    model.eval()
    ids = torch.tensor([tokenizer("What is 2 + 1? 3 is the answer")["input_ids"]])
    mask, keep = torch.ones_like(ids), 4

    def log_probs(scorer):
        return trainer._get_per_token_logps_and_entropies(scorer, ids, mask, keep)[0]

    base = tiny_instruct_llama(tokenizer, seed=3)
    add_fused_lm_head(base, temperature=trainer.temperature)
    assert torch.equal(log_probs(trainer.ref_model), log_probs(base.eval()))
    assert not torch.allclose(log_probs(model), log_probs(trainer.ref_model), atol=1e-3)


def test_accumulation_adds_the_mean_balance_loss_of_the_micro_batches(tokenizer, tmp_path):
    """Two accumulated micro-batches of 4 completions: one SGD step = aux_loss_coef times the mean of their balance
    losses. A constant reward gives zero advantages, so GRPO's own loss has no gradient and the step is the balance
    loss's alone, computed here from the completions the trainer generated.

    The bug it catches: the balance loss scaled for accumulation unlike GRPO's loss. GRPO declares its loss already
    scaled (Trainer divides nothing), so the mixin must divide the aux term by the accumulation steps itself; without
    that it is added 2x too large here. (GRPO's own loss has no gradient in this test: its scaling is TRL's.)"""
    coef = 0.05
    args = sgd_args(
        tmp_path, 4, 2, GoatGRPOConfig, bf16=False, goat_r=8, goat_num_experts=4, aux_loss_coef=coef,
        num_generations=4, max_completion_length=6, beta=0.0,
    )  # fmt: skip
    model = tiny_instruct_llama(tokenizer, seed=3)
    constant = lambda prompts, completions, **kwargs: [1.0] * len(completions)  # noqa: E731
    trainer = GoatGRPOTrainer(model, constant, args=args, train_dataset=PROBLEMS, processing_class=tokenizer)
    start = trainable_copy(model)
    micro_batches = record_training_inputs(trainer)
    trainer.train()
    trained = trainable_copy(model)
    assert [len(batch["completion_ids"]) for batch in micro_batches] == [4, 4]
    assert all(not batch["advantages"].any() for batch in micro_batches)

    def mean_balance_loss(model) -> torch.Tensor:
        balances = []
        for batch in micro_batches:
            model(
                input_ids=torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
                attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
            )
            balances.append(torch.stack(balance_losses(model)).sum())
        return coef * torch.stack(balances).mean()

    model.gradient_checkpointing_disable()  # TRL's configs turn it on; same values, and autograd.grad can run
    expected = sgd_reference_step(model.train(), start, mean_balance_loss)
    assert max_difference(expected, start) > 1e-2  # a real step
    assert max_difference(trained, expected) < 1e-5


def test_beta_zero_needs_no_reference(tokenizer, tmp_path):
    trainer = GoatGRPOTrainer(
        tiny_instruct_llama(tokenizer), length_reward, args=grpo_args(tmp_path, beta=0.0), train_dataset=PROBLEMS,
        processing_class=tokenizer,
    )  # fmt: skip
    assert trainer.ref_model is None and trainer.card_settings["reference model"] == "none (beta 0)"


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (lambda prompts, completions, **kwargs: [math.nan] * len(completions),
         r"returned NaN for completion 0 \(.*\) and 3 more: a NaN reward would turn the advantages"),
        (lambda prompts, completions, **kwargs: [1.0], r"returned 1 rewards for 4 completions; return one reward"),
    ],
    ids=["nan", "wrong-length"],
)  # fmt: skip
def test_a_bad_reward_stops_training_with_the_fix(tokenizer, tmp_path, reward, message):
    trainer = GoatGRPOTrainer(
        tiny_instruct_llama(tokenizer), reward, args=grpo_args(tmp_path, max_steps=1), train_dataset=PROBLEMS,
        processing_class=tokenizer,
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        trainer.train()


def test_settings_goat_cannot_honour_are_refused(tokenizer, tmp_path):
    model = tiny_instruct_llama(tokenizer)
    with pytest.raises(ValueError, match="vLLM cannot run GOAT layers.*use_vllm=False"):
        GoatGRPOTrainer(model, length_reward, args=grpo_args(tmp_path, use_vllm=True), train_dataset=PROBLEMS)
    questions = Dataset.from_list([{"question": "What is 1 + 1?"}])
    with pytest.raises(ValueError, match="train_dataset has no 'prompt' column"):
        GoatGRPOTrainer(model, length_reward, args=grpo_args(tmp_path), train_dataset=questions)
    assert not goat_layers(model)
