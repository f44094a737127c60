"""Exact-match answer extraction and scoring, following LLM-Adapters' evaluation protocol (used by the paper).

- Math (GSM8K and the like): commas are removed and the **last** number of the response is the prediction;
  it is correct when it is within 1e-3 of the reference (`evaluate.py`, `extract_answer_number`).
- Commonsense: the **first** match of the task's answer words (`re.findall(...)[0]`, case-sensitive, as in
  `commonsense_evaluate.py`, `extract_answer`) must equal the record's `answer`.
A response with no answer in it is wrong.
"""

from __future__ import annotations

import re

# LLM-Adapters' number pattern: an optional minus, digits, an optional decimal part.
NUMBER = re.compile(r"-?\d+\.?\d*")
MATH_TOLERANCE = 1e-3

# The eight commonsense sets: LLM-Adapters' dataset name -> the name in the paper's table, in table order.
COMMONSENSE_TASKS = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "social_i_qa": "SIQA",
    "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande",
    "ARC-Easy": "ARC-e",
    "ARC-Challenge": "ARC-c",
    "openbookqa": "OBQA",
}
_ANSWER_WORDS = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": tuple(f"answer{i}" for i in range(1, 6)),
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": tuple(f"answer{i}" for i in range(1, 6)),
    "ARC-Challenge": tuple(f"answer{i}" for i in range(1, 6)),
    "openbookqa": tuple(f"answer{i}" for i in range(1, 6)),
}
_CHOICE_PATTERNS = {task: re.compile("|".join(words)) for task, words in _ANSWER_WORDS.items()}


def extract_number(text: str) -> float | None:
    """The last number in `text` (commas removed), or None when there is none."""
    numbers = NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def reference_number(answer: str | int | float) -> float:
    """The reference value of a math answer: a number, a GSM8K solution ("... #### 72") or a text ending in it."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return float(answer)
    text = str(answer)
    value = extract_number(text.rsplit("####", 1)[1] if "####" in text else text)
    if value is None:
        raise ValueError(f"The reference answer {text[-80:]!r} holds no number; math evaluation needs one.")
    return value


def math_correct(response: str, answer: str | int | float) -> bool:
    """Whether the last number of `response` matches the reference `answer` within 1e-3."""
    prediction = extract_number(response)
    return prediction is not None and abs(prediction - reference_number(answer)) <= MATH_TOLERANCE


def answer_words(task: str) -> tuple[str, ...]:
    """The answer words of a commonsense task (e.g. ('option1', 'option2') for winogrande)."""
    if task not in _ANSWER_WORDS:
        raise ValueError(f"Unknown commonsense task {task!r}; choose one of {', '.join(COMMONSENSE_TASKS)}.")
    return _ANSWER_WORDS[task]


def extract_choice(response: str, task: str) -> str | None:
    """The first answer word of `task` in `response` ('true', 'solution2', 'answer3', ...), or None."""
    answer_words(task)  # validates the task name
    matches = _CHOICE_PATTERNS[task].findall(response.strip())
    return matches[0] if matches else None


def choice_correct(response: str, answer: str, task: str) -> bool:
    """Whether the first answer word of `task` in `response` is the reference `answer`."""
    return extract_choice(response, task) == answer
