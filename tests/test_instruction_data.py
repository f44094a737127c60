"""Alpaca prompts, prompt/completion records and local record files."""

from __future__ import annotations

import json

import pytest

from goat_hf.tasks.instruction_data import alpaca_prompt, load_records, prompt_completion_dataset, to_prompt_completion


def test_alpaca_prompt_with_and_without_input():
    assert alpaca_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    with_input = alpaca_prompt("Add the numbers.", "2, 3")
    assert "paired with an input" in with_input
    assert with_input.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:\n")
    assert alpaca_prompt("Add 2 and 3.", "") == alpaca_prompt("Add 2 and 3.")  # LLM-Adapters' empty input


@pytest.mark.parametrize(
    ("record", "instruction", "completion"),
    [
        ({"query": "What is 2+3?", "response": "2+3=5\nThe answer is: 5", "type": "GSM_AnsAug"}, "What is 2+3?",
         "2+3=5\nThe answer is: 5"),
        ({"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}, "What is 2+3?", "2+3=5\n#### 5"),
        ({"instruction": "Is ice cold?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is "
          "true", "answer": "true"}, "Is ice cold?\n\nAnswer format: true/false", "the correct answer is true"),
    ],
    ids=["metamathqa", "gsm8k", "llm-adapters"],
)  # fmt: skip
def test_records_become_prompt_completion_pairs(record, instruction, completion):
    pair = to_prompt_completion(record)
    assert pair == {"prompt": alpaca_prompt(instruction), "completion": completion}


def test_a_record_without_the_columns_says_which_are_needed():
    with pytest.raises(KeyError, match="needs a non-empty instruction column, one of instruction, query, question"):
        to_prompt_completion({"text": "hello"})
    with pytest.raises(KeyError, match="response column, one of output, response, answer; this one has instruction"):
        to_prompt_completion({"instruction": "hi", "output": ""})


def test_prompt_completion_dataset_keeps_only_the_two_columns():
    dataset = prompt_completion_dataset([{"query": "q", "response": "r", "type": "x"}])
    assert dataset.column_names == ["prompt", "completion"]


def test_load_records_from_json_array_and_jsonl(tmp_path):
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "answer": f"a{i}"} for i in range(5)]
    array = tmp_path / "test.json"
    array.write_text(json.dumps(records))
    lines = tmp_path / "train.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert list(load_records(str(array))) == records
    assert [r["instruction"] for r in load_records(str(lines), max_samples=2)] == ["q0", "q1"]


def test_missing_local_file_is_an_error_not_a_hub_lookup(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file; pass a .json or .jsonl file, or a Hub dataset id"):
        load_records(str(tmp_path / "missing.json"))
