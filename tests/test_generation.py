"""Batched greedy generation: left padding gives what one-prompt-at-a-time generation gives, in prompt order."""

from __future__ import annotations

import pytest
import torch
from instruct_fixtures import smollm2_tokenizer, tiny_instruct_llama
from trainer_fixtures import single_thread

from goat_hf import GoatConfig, get_goat_model
from goat_hf.tasks.generation import generate_responses
from goat_hf.tasks.instruction_data import alpaca_prompt

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

PROMPTS = [
    alpaca_prompt("Ava has 3 apples and gets 4 more. How many apples does Ava have now?"),
    alpaca_prompt("What is 2 + 2?"),
    alpaca_prompt("Is a cat an animal?\n\nAnswer format: true/false", "A short input that makes this prompt longer."),
]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def goat_model(tokenizer):
    return get_goat_model(tiny_instruct_llama(tokenizer), GoatConfig(r=4, num_experts=4, top_k=2))


def one_at_a_time(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(goat_model, tokenizer):
    expected = [one_at_a_time(goat_model, tokenizer, prompt, 6) for prompt in PROMPTS]
    assert len(set(expected)) == 3 and all(expected)
    assert len({len(tokenizer(p)["input_ids"]) for p in PROMPTS}) == 3  # padding is really exercised
    assert generate_responses(goat_model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=6) == expected
    assert generate_responses(goat_model, tokenizer, PROMPTS, batch_size=2, max_new_tokens=6) == expected
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is left as it was


def test_generation_uses_the_cache_and_restores_training_mode(goat_model, tokenizer):
    lengths = []
    hook = goat_model.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    goat_model.train()
    goat_model.config.use_cache = False  # what Trainer leaves behind after training
    try:
        generate_responses(goat_model, tokenizer, PROMPTS[:1], max_new_tokens=4)
    finally:
        hook.remove()
        goat_model.config.use_cache = True
    assert lengths[1:] == [1, 1, 1]  # one new token per step after the prompt
    assert goat_model.training


def test_a_tokenizer_without_pad_token_pads_with_eos(tokenizer):
    model = tiny_instruct_llama(tokenizer)
    expected = generate_responses(model, tokenizer, PROMPTS, max_new_tokens=3)
    no_pad = smollm2_tokenizer()
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    assert generate_responses(model, no_pad, PROMPTS, max_new_tokens=3) == expected


def test_batch_size_must_be_positive(goat_model, tokenizer):
    with pytest.raises(ValueError, match="batch_size=0 must be at least 1"):
        generate_responses(goat_model, tokenizer, PROMPTS, batch_size=0)
