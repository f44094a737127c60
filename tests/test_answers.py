"""Answer extraction on realistic model outputs, following LLM-Adapters' protocol (last number for math, first
answer word for commonsense, case-sensitive)."""

from __future__ import annotations

import pytest

from goat_hf.tasks.answers import (
    COMMONSENSE_TASKS,
    answer_words,
    choice_correct,
    extract_choice,
    extract_number,
    math_correct,
    reference_number,
)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Natalia sold 48 / 2 = 24 clips in May.\n48 + 24 = 72\n#### 72", 72.0),
        ("She pays $1,250 in total.\nThe answer is: 1,250", 1250.0),
        ("The temperature dropped to -4 degrees.", -4.0),
        ("Each costs 3.50 dollars.", 3.5),
        ("So the answer is 19.", 19.0),
        # the model rambles on after its answer: the last number wins, as in LLM-Adapters (so this is scored 12)
        ("12 + 7 = 19\n#### 19\n\n### Response:\nTom has 12", 12.0),
        ("I am not sure how to solve this.", None),
        ("", None),
    ],
    ids=["gsm8k", "commas", "negative", "decimal", "trailing-dot", "rambling", "no-number", "empty"],
)
def test_extract_number_takes_the_last_number(response, expected):
    assert extract_number(response) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (72, 72.0),
        (2.5, 2.5),
        ("72", 72.0),
        ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72", 72.0),
        ("He earns 5 * 200 = 1,000 dollars.\n#### 1,000", 1000.0),
        ("#### -3", -3.0),
        ("The total is 3 + 15 = 18.\nThe answer is: 18", 18.0),  # MetaMathQA
    ],
    ids=["int", "float", "str", "gsm8k", "gsm8k-commas", "gsm8k-negative", "metamath"],
)
def test_reference_number(answer, expected):
    assert reference_number(answer) == expected


def test_reference_without_a_number_is_an_error():
    with pytest.raises(ValueError, match="holds no number; math evaluation needs one"):
        reference_number("#### unknown")


@pytest.mark.parametrize(
    ("response", "answer", "correct"),
    [
        ("3 + 4 = 7\n#### 7", "#### 7", True),
        ("The answer is 7.0004", 7, True),  # within LLM-Adapters' 1e-3
        ("The answer is 7.01", 7, False),
        ("First 5, then 7", "7", True),
        ("It is 7, or maybe 8", "7", False),  # several answers: the last one counts
        ("I do not know.", "7", False),
    ],
    ids=["exact", "within-tolerance", "outside-tolerance", "last-of-two", "two-answers-last-wrong", "no-answer"],
)
def test_math_correct(response, answer, correct):
    assert math_correct(response, answer) is correct


# (task, a realistic response, the extracted answer word)
CHOICE_CASES = [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "the correct answer is false. It is not true that", "false"),  # first match
    ("boolq", "True", None),  # case-sensitive, as in LLM-Adapters
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "Solution1 is better", None),
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("social_i_qa", "answer5", "answer5"),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "the correct answer is ending1 or ending2", "ending1"),
    ("winogrande", "the correct answer is option1", "option1"),
    ("winogrande", "the correct answer is option3", None),
    ("ARC-Easy", "the correct answer is answer2", "answer2"),
    ("ARC-Challenge", "answer4 because answer1 is wrong", "answer4"),
    ("openbookqa", "  the correct answer is answer1\n\n### Instruction:", "answer1"),
    ("openbookqa", "I think it is the second one.", None),
]


@pytest.mark.parametrize(
    ("task", "response", "expected"), CHOICE_CASES, ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(CHOICE_CASES)]
)
def test_extract_choice_takes_the_first_answer_word(task, response, expected):
    assert extract_choice(response, task) == expected
    if expected is not None:
        assert choice_correct(response, expected, task)
    assert not choice_correct(response, "", task)


def test_no_answer_is_wrong_for_every_task():
    for task in COMMONSENSE_TASKS:
        assert extract_choice("I cannot tell.", task) is None
        assert not choice_correct("I cannot tell.", answer_words(task)[0], task)


def test_the_eight_tasks_in_the_papers_order():
    assert list(COMMONSENSE_TASKS.values()) == [
        "BoolQ", "PIQA", "SIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA"
    ]  # fmt: skip
    assert answer_words("winogrande") == ("option1", "option2")
    assert answer_words("hellaswag") == ("ending1", "ending2", "ending3", "ending4")
    assert answer_words("ARC-Challenge")[-1] == "answer5"


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown commonsense task 'arc_easy'; choose one of boolq, piqa"):
        extract_choice("answer1", "arc_easy")
