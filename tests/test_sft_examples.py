"""examples/sft_nlg.py and examples/sft_commonsense.py end to end on a tiny Llama with the SmolLM2 tokenizer."""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
from instruct_fixtures import save_tiny_instruct_model
from trainer_fixtures import single_thread

from goat_hf import GoatConfig, get_goat_model
from goat_hf.adapter_io import adapter_metadata

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# A couple of optimizer steps and a few generated tokens: the tests check the plumbing, not the accuracy.
QUICK = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
         "--max_new_tokens", "4", "--goat_r", "4", "--goat_num_experts", "4", "--logging_steps", "1",
         "--save_strategy", "no", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]  # fmt: skip


@functools.cache
def load_example(name: str):
    """The example script as a module (its main(argv) runs it in this process)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(save_tiny_instruct_model(tmp_path_factory.mktemp("tiny-llama")))


def read_outputs(folder: Path) -> tuple[dict, list[dict], dict]:
    results = json.loads((folder / "eval_results.json").read_text())
    predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    adapter = json.loads((folder / "goat_config.json").read_text())
    return results, predictions, adapter


def test_sft_nlg_offline_default(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    results = load_example("sft_nlg").main(
        ["--model_name_or_path", tiny_model, "--output_dir", str(out), "--num_generated_train", "8",
         "--num_generated_eval", "6", *QUICK]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "Accuracy before training:" in printed and "Accuracy after training:" in printed
    saved, predictions, adapter = read_outputs(out)
    assert saved == results and set(results) == {"eval_records", "accuracy_before", "accuracy_after"}
    assert len(predictions) == 6 and all(isinstance(row["reference"], float) for row in predictions)
    config = GoatConfig.from_dict(adapter["config"])
    assert (config.r, config.num_experts, config.top_k, config.lora_dropout) == (4, 4, 2, 0.05)


def test_sft_nlg_local_files(tiny_model, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"instruction": f"What is {i} + 1?", "input": "", "output": f"{i + 1}"}) + "\n"
                             for i in range(8)))  # fmt: skip
    gsm8k = tmp_path / "test.json"
    gsm8k.write_text(json.dumps([{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
                                 {"question": "What is 3 * 3?", "answer": "3 * 3 = 9\n#### 9"}]))  # fmt: skip
    results = load_example("sft_nlg").main(
        ["--model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out"), "--train_data", str(train),
         "--eval_data", str(gsm8k), "--eval_before_training", "false", *QUICK]
    )  # fmt: skip
    assert results["eval_records"] == 2 and "accuracy_before" not in results
    _, predictions, _ = read_outputs(tmp_path / "out")
    assert [row["reference"] for row in predictions] == [4.0, 9.0]


def test_nlg_generated_problems_are_exact_and_disjoint():
    nlg = load_example("sft_nlg")
    train, evaluation = nlg.generated_problems(200, 50, seed=0)
    assert len(train) == 200 and len(evaluation) == 50
    assert not {r["query"] for r in train} & {r["query"] for r in evaluation}
    for record in train + evaluation:
        *steps, final = record["response"].split("\n")
        for step in steps:  # every equation in the solution is right
            left, right = step.split(" = ")
            assert eval(left) == int(right)  # noqa: S307 - the generator's own arithmetic
        assert final == f"#### {steps[-1].split(' = ')[1]}"
    assert nlg.generated_problems(20, 5, seed=0) == nlg.generated_problems(20, 5, seed=0)


def test_sft_commonsense_offline_default(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    results = load_example("sft_commonsense").main(
        ["--model_name_or_path", tiny_model, "--output_dir", str(out), "--num_generated_train", "16",
         "--num_generated_eval", "2", *QUICK]
    )  # fmt: skip
    columns = ["BoolQ", "PIQA", "SIQA", "HellaSwag", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "Avg"]
    assert list(results) == ["before", "after"] and all(list(r) == columns for r in results.values())
    printed = capsys.readouterr().out
    assert "| | " + " | ".join(columns) + " |" in printed and "| before |" in printed and "| after |" in printed
    saved, predictions, _ = read_outputs(out)
    assert saved == results and len(predictions) == 16
    assert results["after"]["Avg"] == pytest.approx(sum(results["after"][c] for c in columns[:-1]) / 8)


def test_sft_commonsense_llm_adapters_files(tiny_model, tmp_path):
    commonsense = load_example("sft_commonsense")
    rng = random.Random(0)
    train = tmp_path / "commonsense_170k.json"
    train.write_text(json.dumps([commonsense.commonsense_record(t, rng) for t in ("boolq", "winogrande") * 4]))
    (tmp_path / "dataset" / "boolq").mkdir(parents=True)
    (tmp_path / "dataset" / "boolq" / "test.json").write_text(
        json.dumps([commonsense.commonsense_record("boolq", rng) for _ in range(3)])
    )
    winogrande = tmp_path / "winogrande.jsonl"
    winogrande.write_text(
        "".join(json.dumps(commonsense.commonsense_record("winogrande", rng)) + "\n" for _ in range(2))
    )
    results = commonsense.main(
        ["--model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out"), "--train_data", str(train),
         "--eval_data_dir", str(tmp_path / "dataset"), "--eval_tasks", "boolq",
         "--eval_data", f"winogrande={winogrande}", "--eval_before_training", "false", *QUICK]
    )  # fmt: skip
    assert list(results["after"]) == ["BoolQ", "WinoGrande", "Avg"]
    _, predictions, _ = read_outputs(tmp_path / "out")
    assert [row["task"] for row in predictions] == ["boolq"] * 3 + ["winogrande"] * 2


def test_commonsense_generated_records_follow_llm_adapters_format():
    commonsense = load_example("sft_commonsense")
    train, evaluation = commonsense.generated_sets(list(commonsense.COMMONSENSE_TASKS), 80, 4, seed=0)
    assert len(train) == 80 and [len(records) for records in evaluation.values()] == [4] * 8
    for task, records in evaluation.items():
        for record in records:
            words = commonsense.answer_words(task)
            assert record["answer"] in words and record["output"] == f"the correct answer is {record['answer']}"
            assert record["instruction"].endswith("Answer format: " + "/".join(
                w for w in words if w in record["instruction"].split("Answer format: ")[1].split("/")))  # fmt: skip
    with pytest.raises(ValueError, match="Unknown commonsense task 'arc'"):
        commonsense.main(["--eval_tasks", "arc", "--output_dir", "unused"])


def test_the_offline_default_records_the_bundled_base_by_its_hub_id(tmp_path):
    """The bundled SmolLM2 is converted into a cache folder: goat_config.json names its Hub id, not that path."""
    sft_nlg = load_example("sft_nlg")
    script_args, training_args = sft_nlg.parse_arguments(sft_nlg.ScriptArguments, ["--output_dir", str(tmp_path)])
    model, _ = sft_nlg.load_model_and_tokenizer(script_args, training_args)
    get_goat_model(model, GoatConfig(r=4, num_experts=2, top_k=1, target_modules=["q_proj"]))
    assert adapter_metadata(model)["base_model"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
