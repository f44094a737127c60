"""The input checks of the GOAT DPO and GRPO trainers: each bad input is refused with a message naming the fix, and
good input passes untouched."""

from __future__ import annotations

import math

import pytest
from datasets import Dataset, IterableDataset

from goat_hf.trl_inputs import check_preference_dataset, check_prompt_dataset, checked_reward

PAIRS = [
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
    {"prompt": "1 + 1 =", "chosen": " 2", "rejected": " 3"},
]


def test_good_pairs_pass_in_every_form():
    check_preference_dataset(Dataset.from_list(PAIRS), "train_dataset")
    check_preference_dataset(IterableDataset.from_generator(lambda: iter(PAIRS)), "train_dataset")
    implicit = [{"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]} for row in PAIRS]
    check_preference_dataset(Dataset.from_list(implicit), "train_dataset")  # the prompt as the common start
    check_preference_dataset(None, "eval_dataset")


def test_a_streamed_dataset_is_checked_on_its_first_row():
    rows = [{"prompt": "x", "chosen": "", "rejected": " y"}] + PAIRS
    with pytest.raises(ValueError, match="stream row 0 has an empty chosen completion"):
        check_preference_dataset(IterableDataset.from_generator(lambda: iter(rows)), "stream")


def test_an_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="train_dataset has no rows; DPO needs preference pairs"):
        check_preference_dataset(Dataset.from_list([]), "train_dataset")
    with pytest.raises(ValueError, match="train_dataset has no rows; GRPO needs prompts"):
        check_prompt_dataset([], "train_dataset")


def test_a_grpo_dataset_needs_prompts():
    check_prompt_dataset(Dataset.from_list([{"prompt": "2 + 2 =", "answer": "4"}]), "train_dataset")
    with pytest.raises(ValueError, match=r"has no 'prompt' column \(its columns: question, answer\).*rename_column"):
        check_prompt_dataset(Dataset.from_list([{"question": "2 + 2 =", "answer": "4"}]), "train_dataset")


def exact(prompts, completions, answer, **kwargs):
    return [
        1.0 if completion.strip() == target else 0.0 for completion, target in zip(completions, answer, strict=True)
    ]


def test_a_checked_reward_passes_rewards_and_none_through_and_keeps_its_name():
    checked = checked_reward(exact)
    assert checked.__name__ == "exact"  # TRL logs each reward under its function's name
    assert checked(prompts=["a", "b"], completions=[" 4", "5"], answer=["4", "4"]) == [1.0, 0.0]
    maybe = checked_reward(lambda prompts, completions, **kwargs: [None, 0.5])
    assert maybe(prompts=["a", "b"], completions=["x", "y"]) == [None, 0.5]  # None: "does not apply", as in TRL


def test_a_reward_of_the_wrong_length_is_refused():
    short = checked_reward(lambda prompts, completions, **kwargs: [1.0])
    with pytest.raises(ValueError, match=r"returned 1 rewards for 3 completions; return one reward \(a float"):
        short(prompts=["a"] * 3, completions=["x", "y", "z"])


def test_a_nan_reward_is_refused_naming_the_completion():
    def ratio(prompts, completions, **kwargs):
        return [len(c) / len(c) if c else math.nan for c in completions]

    with pytest.raises(ValueError, match=r"'ratio' returned NaN for completion 1 \(''\) and 1 more: a NaN reward"):
        checked_reward(ratio)(prompts=["a"] * 3, completions=["x", "", ""])
