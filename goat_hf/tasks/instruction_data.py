"""Instruction data in the paper's format: Alpaca-style prompts and prompt/completion records for TRL.

The math (MetaMathQA -> GSM8K) and commonsense (Commonsense170K, LLM-Adapters) setups both train on the
Alpaca template. Each record becomes {"prompt": template, "completion": response}: with that layout TRL's
SFTTrainer masks the prompt tokens (labels -100), so the loss covers the response only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, load_dataset

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# Column names, in order of preference: LLM-Adapters (instruction/output), MetaMathQA (query/response),
# GSM8K (question/answer). A record with both `output` and `answer` (LLM-Adapters) trains on `output`.
INSTRUCTION_KEYS = ("instruction", "query", "question")
RESPONSE_KEYS = ("output", "response", "answer")


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt, ending in "### Response:\\n".

    It ends on a newline, so the tokenized prompt is a prefix of the tokenized prompt + response and the
    completion mask falls exactly on the response (the original template ends in "### Response:" and relies
    on SentencePiece's leading space).
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _first_key(record: dict[str, Any], keys: tuple[str, ...], role: str) -> str:
    for key in keys:
        if record.get(key) not in (None, ""):
            return key
    raise KeyError(
        f"An instruction record needs a non-empty {role} column, one of {', '.join(keys)}; "
        f"this one has {', '.join(sorted(record)) or 'no columns'}."
    )


def record_prompt(record: dict[str, Any]) -> str:
    """The Alpaca prompt of a record (`instruction` [+ `input`], `query` or `question`)."""
    return alpaca_prompt(str(record[_first_key(record, INSTRUCTION_KEYS, "instruction")]), record.get("input"))


def record_response(record: dict[str, Any]) -> str:
    """The target response of a record (`output`, `response` or `answer`)."""
    return str(record[_first_key(record, RESPONSE_KEYS, "response")])


def to_prompt_completion(record: dict[str, Any]) -> dict[str, str]:
    """{"prompt", "completion"}: TRL's SFTTrainer then computes the loss on the completion only."""
    return {"prompt": record_prompt(record), "completion": record_response(record)}


def prompt_completion_dataset(records: Dataset | list[dict[str, Any]]) -> Dataset:
    """A prompt/completion dataset (only those two columns) from instruction records."""
    return Dataset.from_list([to_prompt_completion(record) for record in records])


def load_records(
    source: str, split: str = "train", config: str | None = None, max_samples: int | None = None
) -> Dataset:
    """Records from a local .json/.jsonl file (a JSON array or one object per line) or a Hub dataset id.

    A path that exists, or that ends in .json/.jsonl, is read locally; anything else goes to the Hub.
    `max_samples` keeps the first examples (the paper's MetaMathQA-100k is the first 100k of MetaMathQA).
    """
    path = Path(source)
    if path.exists() or path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"{source} is not a file; pass a .json or .jsonl file, or a Hub dataset id.")
        dataset = load_dataset("json", data_files=str(path), split="train")
    else:
        dataset = load_dataset(source, config, split=split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset
