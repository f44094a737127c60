"""Commonsense instruction tuning with GOAT (the paper's LLM-Adapters setup), evaluated on the eight sets.

Records use LLM-Adapters' format: `instruction` (question, options and "Answer format: ..."), `input`,
`output` ("the correct answer is answer2") and `answer` ("answer2"). Training uses Alpaca-style prompts as
prompt/completion pairs, so TRL's SFTTrainer computes a **completion-only loss** (prompt tokens masked).
Evaluation generates greedily in batches (left padding) and scores by **exact match** with LLM-Adapters'
extraction: the first of the task's answer words in the response (true/false for BoolQ, solution1/2 for
PIQA, answer1-5 for SIQA, ARC-e, ARC-c and OBQA, ending1-4 for HellaSwag, option1/2 for WinoGrande) must be
the record's `answer`. Prints a per-task and average accuracy table and writes it to eval_results.json.

Offline default (no Hub): SmolLM2-135M-Instruct on multiple-choice data this script generates in the same
format, one set per task (seeded, exact answers); accuracy before and after training:

    python examples/sft_commonsense.py

The paper (LLaMA-2-7B; GOAT 82.73 vs LoRA 77.61 average) trains on Commonsense170K for 3 epochs with r=32,
8 experts, top-2, lr 1e-4, eta=0.1, dropout 0.05, cosine schedule, 3% warmup; those are this script's
defaults. With LLM-Adapters' files (dataset/<task>/test.json):

    python examples/sft_commonsense.py --model_name_or_path meta-llama/Llama-2-7b-hf \\
        --model_init_kwargs '{"dtype": "bfloat16"}' --bf16 true \\
        --train_data commonsense_170k.json --eval_data_dir dataset \\
        --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --output_dir outputs/goat-commonsense

QLoRA-style, on one GPU: add --load_in_4bit true (NF4, double quantisation; bitsandbytes).

--eval_data boolq=FILE_OR_HUB_ID ... names sets one by one (Hub ids only when you name them). Every GOAT
flag (--goat_r, --goat_eta, --aux_loss_coef, ...) and every SFTConfig flag is available: see --help.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sft_common.py, when imported from elsewhere

from sft_common import (  # noqa: E402
    ModelAndDataArguments,
    load_model_and_tokenizer,
    parse_arguments,
    train_goat,
    training_records,
    write_card,
    write_results,
)

from goat_hf.tasks.answers import COMMONSENSE_TASKS, answer_words, choice_correct, extract_choice  # noqa: E402
from goat_hf.tasks.generation import generate_responses  # noqa: E402
from goat_hf.tasks.instruction_data import load_records, record_prompt  # noqa: E402

# Flag defaults: the paper's commonsense recipe (r=32, eta=0.1, lr 1e-4, 3 epochs; 8 experts, top-2 from
# GoatConfig; sft_common's shared defaults).
DEFAULTS = {
    "output_dir": "outputs/sft_commonsense",
    "num_train_epochs": 3,
    "learning_rate": 1e-4,
    "goat_r": 32,
    "goat_eta": 0.1,
}
NAMES = ("Ava", "Ben", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Max")
CATEGORIES = {
    "fruit": ("apple", "banana", "cherry", "grape", "mango", "pear"),
    "animal": ("dog", "cat", "horse", "rabbit", "lion", "cow"),
    "tool": ("hammer", "saw", "wrench", "screwdriver", "drill", "shovel"),
    "vehicle": ("car", "bus", "bicycle", "train", "truck", "boat"),
    "musical instrument": ("piano", "guitar", "violin", "drum", "flute", "trumpet"),
}
USES = {
    "umbrella": "stay dry in the rain",
    "knife": "cut bread",
    "towel": "dry your hands",
    "pen": "write a letter",
    "key": "open a locked door",
    "spoon": "eat soup",
    "ladder": "reach a high shelf",
    "broom": "sweep the floor",
    "scissors": "cut paper",
    "pillow": "rest your head",
    "oven": "bake a cake",
    "soap": "wash your hands",
    "map": "find your way",
    "clock": "tell the time",
    "fridge": "keep food cold",
    "lamp": "light a dark room",
}
FEELINGS = {
    "won the race": "proud",
    "lost their wallet": "worried",
    "got a birthday present": "happy",
    "missed the last bus": "frustrated",
    "ran ten miles": "tired",
    "heard a strange noise at night": "scared",
}
SIZES = ("coin", "cup", "book", "chair", "bed", "car", "bus", "house")  # smallest to largest


@dataclass
class ScriptArguments(ModelAndDataArguments):
    eval_data_dir: str | None = field(
        default=None,
        metadata={"help": "LLM-Adapters' dataset folder: <dir>/<task>/test.json for each task of --eval_tasks."},
    )
    eval_data: list[str] | None = field(
        default=None,
        metadata={
            "help": "Evaluation sets as task=FILE_OR_HUB_ID (e.g. boolq=boolq/test.json); these override "
            "--eval_data_dir. Default (neither given): generated sets."
        },
    )
    eval_tasks: list[str] = field(
        default_factory=lambda: list(COMMONSENSE_TASKS),
        metadata={"help": f"Tasks to evaluate, LLM-Adapters' names: {', '.join(COMMONSENSE_TASKS)}."},
    )
    eval_split: str = field(default="test", metadata={"help": "Split of Hub evaluation sets."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N of each set."})
    num_generated_train: int = field(default=96, metadata={"help": "Generated training records (offline)."})
    num_generated_eval: int = field(default=12, metadata={"help": "Generated evaluation records per task."})
    max_new_tokens: int = field(default=32, metadata={"help": "Generation length (LLM-Adapters: 32)."})


# ---- the generated data: LLM-Adapters' instruction formats, contents from the small banks above ----


def _choices(question: str, options: list[str], label: str, correct: int) -> tuple[str, str]:
    """The instruction listing `options` as Label1..LabelN, and the answer word of option `correct`."""
    lines = "".join(f"\n\n{label.capitalize()}{i}: {option}" for i, option in enumerate(options, 1))
    formats = "/".join(f"{label}{i}" for i in range(1, len(options) + 1))
    return f"{question}{lines}\n\nAnswer format: {formats}", f"{label}{correct + 1}"


def _shuffled(rng: random.Random, correct: str, wrong: list[str]) -> tuple[list[str], int]:
    options = [correct, *wrong]
    rng.shuffle(options)
    return options, options.index(correct)


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _boolq(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(list(CATEGORIES))
    item = rng.choice(CATEGORIES[category])
    asked = category if rng.random() < 0.5 else rng.choice([c for c in CATEGORIES if c != category])
    question = f"Please answer the following question with true or false, question: is {_a(item)} {_a(asked)}?"
    return f"{question}\n\nAnswer format: true/false", str(asked == category).lower()


def _object_for_use(rng: random.Random, count: int) -> tuple[str, list[str], int]:
    """A use, `count` objects (one of them made for it) and the index of that one."""
    obj = rng.choice(list(USES))
    return (USES[obj], *_shuffled(rng, obj, rng.sample([o for o in USES if o != obj], count - 1)))


def _piqa(rng: random.Random) -> tuple[str, str]:
    use, options, correct = _object_for_use(rng, 2)
    question = f"Please choose the correct solution to the question: how do you {use}?"
    return _choices(question, [f"Use the {o}." for o in options], "solution", correct)


def _hellaswag(rng: random.Random) -> tuple[str, str]:
    use, options, correct = _object_for_use(rng, 4)
    name = rng.choice(NAMES)
    sentence = f"{name} wants to {use}, so {name} takes the"
    question = f"Please choose the correct ending to complete the given sentence: {sentence}"
    return _choices(question, [f"{o}." for o in options], "ending", correct)


def _openbookqa(rng: random.Random) -> tuple[str, str]:
    use, options, correct = _object_for_use(rng, 4)
    return _choices(
        f"Please choose the correct answer to the question: Which object is used to {use}?", options, "answer", correct
    )


def _social_i_qa(rng: random.Random) -> tuple[str, str]:
    name, event = rng.choice(NAMES), rng.choice(list(FEELINGS))
    feeling = FEELINGS[event]
    options, correct = _shuffled(rng, feeling, rng.sample([f for f in FEELINGS.values() if f != feeling], 2))
    question = f"Please choose the correct answer to the question: {name} {event}. How would {name} feel?"
    return _choices(question, options, "answer", correct)


def _winogrande(rng: random.Random) -> tuple[str, str]:
    small, large = (SIZES[i] for i in sorted(rng.sample(range(len(SIZES)), 2)))
    too = rng.choice(("big", "small"))
    verb = rng.choice(("does not fit in", "cannot go inside"))
    sentence = f"The {large} {verb} the {small} because the _ is too {too}."
    options, correct = _shuffled(rng, large if too == "big" else small, [small if too == "big" else large])
    return _choices(
        f"Please choose the correct answer to fill in the blank to complete the given sentence: {sentence}",
        options,
        "option",
        correct,
    )


def _arc(rng: random.Random, negated: bool) -> tuple[str, str]:
    """ARC-e: the one member of a category among three outsiders; ARC-c: the one outsider among three members."""
    category = rng.choice(list(CATEGORIES))
    members = rng.sample(CATEGORIES[category], 3)
    outsiders = rng.sample([item for c, items in CATEGORIES.items() if c != category for item in items], 3)
    if negated:
        question, (options, correct) = f"Which of these is not {_a(category)}?", _shuffled(rng, outsiders[0], members)
    else:
        question, (options, correct) = f"Which of these is {_a(category)}?", _shuffled(rng, members[0], outsiders)
    return _choices(f"Please choose the correct answer to the question: {question}", options, "answer", correct)


GENERATORS = {
    "boolq": _boolq,
    "piqa": _piqa,
    "social_i_qa": _social_i_qa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "ARC-Easy": lambda rng: _arc(rng, negated=False),
    "ARC-Challenge": lambda rng: _arc(rng, negated=True),
    "openbookqa": _openbookqa,
}


def commonsense_record(task: str, rng: random.Random) -> dict[str, str]:
    """One record of `task` in LLM-Adapters' format, with an exact answer."""
    instruction, answer = GENERATORS[task](rng)
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def generated_sets(tasks: list[str], num_train: int, num_eval: int, seed: int) -> tuple[list[dict], dict]:
    """A Commonsense170K-like training mix over `tasks` and one evaluation set per task, disjoint from it."""
    rng, seen = random.Random(seed), set()

    def fresh(task: str) -> dict[str, str]:
        for _ in range(1000):
            record = commonsense_record(task, rng)
            if record["instruction"] not in seen:
                seen.add(record["instruction"])
                return record
        raise RuntimeError(
            f"The generator ran out of distinct {task} records: lower --num_generated_train or --num_generated_eval."
        )

    evaluation = {task: [fresh(task) for _ in range(num_eval)] for task in tasks}
    train = [fresh(tasks[i % len(tasks)]) for i in range(num_train)]
    rng.shuffle(train)
    return train, evaluation


# ---- evaluation ----


def evaluation_sources(script_args: ScriptArguments) -> dict[str, str]:
    """task -> file or Hub id, from --eval_data_dir and --eval_data; empty when the sets are to be generated."""
    sources = {}
    if script_args.eval_data_dir:
        sources = {task: str(Path(script_args.eval_data_dir) / task / "test.json") for task in script_args.eval_tasks}
    for item in script_args.eval_data or []:
        task, sep, source = item.partition("=")
        if not sep:
            raise ValueError(f"--eval_data {item!r} must be task=FILE_OR_HUB_ID, e.g. boolq=boolq/test.json.")
        answer_words(task)  # a known task name
        sources[task] = source
    return sources


def evaluate(
    model, tokenizer, sets: dict[str, list[dict]], script_args: ScriptArguments, batch_size: int, stage: str
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Per-task accuracy (keys: the paper's task names) plus their mean, and one prediction row per record."""
    accuracies, rows = {}, []
    for task, records in sets.items():
        responses = generate_responses(
            model,
            tokenizer,
            [record_prompt(r) for r in records],
            batch_size=batch_size,
            max_new_tokens=script_args.max_new_tokens,
            desc=f"{stage} {task}",
        )
        correct = [choice_correct(text, r["answer"], task) for r, text in zip(records, responses, strict=True)]
        accuracies[COMMONSENSE_TASKS[task]] = sum(correct) / max(len(correct), 1)
        rows += [
            {
                "task": task,
                "prompt": record_prompt(r),
                "response": text,
                "prediction": extract_choice(text, task),
                "answer": r["answer"],
                "correct": ok,
            }
            for r, text, ok in zip(records, responses, correct, strict=True)
        ]
    accuracies["Avg"] = sum(accuracies.values()) / max(len(accuracies), 1)
    return accuracies, rows


def print_table(results: dict[str, dict[str, float]]) -> None:
    """A markdown table: one row per stage (before/after), one column per task and the average."""
    columns = list(next(iter(results.values())))
    print("| | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for stage, accuracies in results.items():
        print(f"| {stage} | " + " | ".join(f"{100 * accuracies[c]:.1f}" for c in columns) + " |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start = time.perf_counter()
    script_args, training_args = parse_arguments(ScriptArguments, argv, **DEFAULTS)
    for task in script_args.eval_tasks:
        answer_words(task)  # fail on a misspelt task before loading anything
    sources = evaluation_sources(script_args)
    model, tokenizer = load_model_and_tokenizer(script_args, training_args)
    train, sets = [], {}
    if not (script_args.train_data and sources):
        train, sets = generated_sets(
            script_args.eval_tasks, script_args.num_generated_train, script_args.num_generated_eval, training_args.seed
        )
    if script_args.train_data:
        train = training_records(script_args)
    if sources:
        sets = {
            task: list(load_records(source, script_args.eval_split, max_samples=script_args.max_eval_samples))
            for task, source in sources.items()
        }
    print(f"{len(train)} training records; evaluation: {', '.join(f'{t} {len(r)}' for t, r in sets.items())}")

    batch_size = training_args.per_device_eval_batch_size
    results: dict[str, dict[str, float]] = {}
    if script_args.eval_before_training:
        results["before"], _ = evaluate(model, tokenizer, sets, script_args, batch_size, "Before")
    trainer = train_goat(model, tokenizer, train, training_args)
    results["after"], predictions = evaluate(trainer.model, tokenizer, sets, script_args, batch_size, "After")
    print_table(results)
    write_results(training_args.output_dir, results, predictions)
    generated = "commonsense questions generated by examples/sft_commonsense.py (seeded)"
    evaluated = "; ".join(f"{task}: {source}" for task, source in sources.items()) or generated
    scores = {f"eval_{task}_accuracy": value for task, value in results["after"].items() if task != "Avg"}
    write_card(trainer, script_args, script_args.train_data or generated, evaluated,
               {"eval_accuracy": results["after"]["Avg"], **scores})  # fmt: skip
    print(f"Done in {time.perf_counter() - start:.0f} s; the adapter is in {training_args.output_dir}")
    return results


if __name__ == "__main__":
    main()
