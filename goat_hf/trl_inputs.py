"""Bad input to the GOAT DPO and GRPO trainers, caught before training with a message that says what to fix:
a preference dataset without `chosen`/`rejected` or with an empty completion, a GRPO dataset without prompts, and a
reward function that returns NaN or the wrong number of rewards."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

PAIR_COLUMNS = ("chosen", "rejected")


def _rows(dataset: Any) -> list[dict[str, Any]]:
    """Every row of a map-style dataset (or list); the first row of a streamed one, which cannot be read twice."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        return list(dataset)
    first = next(iter(dataset), None)
    return [] if first is None else [first]


def _is_empty(completion: Any) -> bool:
    if isinstance(completion, str):
        return not completion.strip()
    if isinstance(completion, list):  # conversational: a list of messages
        return not any(str(message.get("content", "")).strip() for message in completion if isinstance(message, dict))
    return completion is None


def check_preference_dataset(dataset: Any, name: str) -> None:
    """A DPO dataset needs `chosen` and `rejected` completions, none of them empty."""
    if dataset is None:
        return
    rows = _rows(dataset)
    if not rows:
        raise ValueError(f"{name} has no rows; DPO needs preference pairs to train on.")
    missing = [column for column in PAIR_COLUMNS if column not in rows[0]]
    if missing:
        raise ValueError(
            f"{name} has no {' and no '.join(repr(c) for c in missing)} column (its columns: "
            f"{', '.join(rows[0])}). DPO needs preference pairs: a 'chosen' and a 'rejected' completion per row, with "
            "a 'prompt' column or the prompt as their common start. Rename the columns, e.g. "
            "dataset.rename_column('preferred', 'chosen')."
        )
    for index, row in enumerate(rows):
        empty = [column for column in PAIR_COLUMNS if _is_empty(row[column])]
        if empty:
            raise ValueError(
                f"{name} row {index} has an empty {' and an empty '.join(empty)} completion: a pair needs two answers "
                "to compare. Drop such rows first, e.g. dataset.filter(lambda row: row['chosen'].strip() and "
                "row['rejected'].strip())."
            )


def check_prompt_dataset(dataset: Any, name: str) -> None:
    """A GRPO dataset needs a `prompt` per row: the completions are generated from it."""
    if dataset is None:
        return
    rows = _rows(dataset)
    if not rows:
        raise ValueError(f"{name} has no rows; GRPO needs prompts to generate completions for.")
    if "prompt" not in rows[0]:
        raise ValueError(
            f"{name} has no 'prompt' column (its columns: {', '.join(rows[0])}); GRPO generates completions from "
            "it. Rename the column that holds the prompts, e.g. dataset.rename_column('question', 'prompt')."
        )


def checked_reward(function: Callable[..., list]) -> Callable[..., list]:
    """`function` with its rewards checked: one per completion, none NaN (None still means "does not apply", as in
    TRL). Keeps the function's name, which TRL logs its rewards under."""

    @functools.wraps(function)
    def checked(*args: Any, prompts: list, completions: list, **kwargs: Any) -> list:
        rewards = list(function(*args, prompts=prompts, completions=completions, **kwargs))
        if len(rewards) != len(completions):
            raise ValueError(
                f"The reward function {function.__name__!r} returned {len(rewards)} rewards for {len(completions)} "
                "completions; return one reward (a float, or None where it does not apply) per completion, in order."
            )
        bad = [index for index, reward in enumerate(rewards) if reward is not None and math.isnan(float(reward))]
        if bad:
            raise ValueError(
                f"The reward function {function.__name__!r} returned NaN for completion {bad[0]} "
                f"({completions[bad[0]]!r}){f' and {len(bad) - 1} more' if len(bad) > 1 else ''}: a NaN reward would "
                "turn the advantages of its whole group into NaN. Return a number, or None where the reward does not "
                "apply."
            )
        return rewards

    return checked
