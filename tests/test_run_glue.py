"""examples/run_glue.py end to end on tiny csv files and a tiny BERT saved to tmp_path (no downloads)."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from safetensors.torch import load_file
from transformers import BertTokenizer

from goat_hf import GoatConfig, get_goat_model
from goat_hf.adapter_io import adapter_metadata
from goat_hf.tasks.assets import MINILM_HUB_ID

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "run_glue.py"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def run_glue():
    spec = importlib.util.spec_from_file_location("run_glue", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_glue"] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules["run_glue"]


def write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def tiny_bert(tmp_path, classifier_factory, run_glue):
    """A 2-layer BERT encoder (no task head, like all-MiniLM-L6-v2) and a word-level tokenizer for the task words."""
    texts = [run_glue.SUBJECTS, run_glue.POSITIVE, run_glue.NEGATIVE, *run_glue.TEMPLATES, *run_glue.INTENSIFIERS]
    words = sorted({word for text in texts for word in re.findall(r"[a-z]+", text)})
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words, ".", ","])}
    folder = tmp_path / "tiny-bert"
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    classifier_factory("bert", vocab_size=len(vocab)).bert.save_pretrained(folder)
    return str(folder)


def common_args(model: str, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", model, "--output_dir", str(output_dir), "--num_train_epochs", "1",
        "--per_device_train_batch_size", "16", "--logging_steps", "2", "--disable_tqdm", "true",
    ]  # fmt: skip


def test_classification_from_csv_files(tmp_path, tiny_bert, run_glue):
    data = run_glue.synthetic_sentiment(train_samples=64, seed=1)
    names = data["train"].features["label"].names
    files = {
        split: write_csv(tmp_path / f"{split}.csv", [{"sentence": r["sentence"], "label": names[r["label"]]}
                                                     for r in data[split]])
        for split in ("train", "validation", "test")
    }  # fmt: skip
    output_dir = tmp_path / "out"
    metrics = run_glue.main([
        *common_args(tiny_bert, output_dir), "--train_file", files["train"], "--validation_file",
        files["validation"], "--test_file", files["test"], "--do_train", "--do_eval", "--do_predict",
    ])  # fmt: skip

    for name in ("goat_config.json", "goat_adapter.safetensors", "README.md", "tokenizer_config.json"):
        assert (output_dir / name).is_file(), name
    results = json.loads((output_dir / "all_results.json").read_text())
    assert {"train_loss", "eval_loss", "eval_accuracy", "eval_samples"} <= set(results)
    assert results["eval_accuracy"] == metrics["eval_accuracy"]
    assert "eval_accuracy" in (output_dir / "README.md").read_text()
    rows = (output_dir / "predict_results_custom.txt").read_text().splitlines()
    assert rows[0] == "index\tprediction" and len(rows) == 1 + len(data["test"])
    assert {row.split("\t")[1] for row in rows[1:]} <= {"negative", "positive"}  # string labels mapped back


def test_regression_from_float_labels(tmp_path, tiny_bert, run_glue):
    data = run_glue.synthetic_sentiment(train_samples=32, seed=2)["train"]
    rows = [
        {"sentence1": a, "sentence2": b, "label": 2.5 + 2.5 * (la - lb)}
        for a, b, la, lb in zip(data["sentence"][::2], data["sentence"][1::2], data["label"][::2], data["label"][1::2],
                                strict=True)
    ]  # fmt: skip
    train, validation = write_csv(tmp_path / "train.csv", rows), write_csv(tmp_path / "dev.csv", rows[:8])
    output_dir = tmp_path / "out"
    run_glue.main([*common_args(tiny_bert, output_dir), "--train_file", train, "--validation_file", validation])

    results = json.loads((output_dir / "all_results.json").read_text())
    assert {"train_loss", "eval_mse"} <= set(results)
    adapter = load_file(output_dir / "goat_adapter.safetensors")
    assert adapter["classifier.weight"].shape == (1, 64)  # num_labels = 1: one regression output


def test_mnli_is_evaluated_matched_and_mismatched(tmp_path, tiny_bert, run_glue, monkeypatch):
    """GLUE's layout (ClassLabel labels, -1 on the test sets) through --task_name, with the Hub replaced."""
    sentences = run_glue.synthetic_sentiment(train_samples=48, seed=4)["train"]["sentence"]
    features = Features({
        "premise": Value("string"), "hypothesis": Value("string"),
        "label": ClassLabel(names=["entailment", "neutral", "contradiction"]),
    })  # fmt: skip

    def glue_split(size: int, labelled: bool = True) -> Dataset:
        rows = {"premise": sentences[:size], "hypothesis": sentences[-size:]}
        return Dataset.from_dict({**rows, "label": [i % 3 if labelled else -1 for i in range(size)]}, features)

    glue = DatasetDict({
        "train": glue_split(48), "validation_matched": glue_split(12), "validation_mismatched": glue_split(9),
        "test_matched": glue_split(5, labelled=False), "test_mismatched": glue_split(4, labelled=False),
    })  # fmt: skip
    requests = []
    monkeypatch.setattr(run_glue, "load_dataset", lambda *args, **kwargs: requests.append(args) or glue)
    output_dir = tmp_path / "out"
    run_glue.main([*common_args(tiny_bert, output_dir), "--task_name", "mnli", "--do_train", "--do_eval",
                   "--do_predict"])  # fmt: skip

    assert requests == [("nyu-mll/glue", "mnli")]
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_samples"] == 12 and results["eval_samples_mm"] == 9
    assert {"eval_accuracy", "eval_accuracy_mm"} <= set(results)
    for name, size in (("predict_results_mnli.txt", 5), ("predict_results_mnli-mm.txt", 4)):
        rows = (output_dir / name).read_text().splitlines()[1:]
        assert len(rows) == size and {row.split("\t")[1] for row in rows} <= {"entailment", "neutral", "contradiction"}
    assert "nyu-mll/glue" in (output_dir / "README.md").read_text()


def test_no_arguments_mean_the_offline_demo(run_glue):
    model_args, data_args, training_args = run_glue.parse_arguments([])
    assert model_args.model_name_or_path is None and data_args.name == run_glue.TWEET_TASK
    assert training_args.output_dir == "outputs/glue-demo"
    assert training_args.do_train and training_args.do_eval and not training_args.do_predict


def test_synthetic_task_is_balanced_seeded_and_held_out(run_glue):
    data = run_glue.synthetic_sentiment(train_samples=200, seed=3)
    assert data["train"]["sentence"] == run_glue.synthetic_sentiment(train_samples=200, seed=3)["train"]["sentence"]
    for split in data.values():
        assert sum(split["label"]) * 2 == len(split)
    assert not set(data["validation"]["sentence"]) & set(data["train"]["sentence"])
    assert not set(data["test"]["sentence"]) & set(data["train"]["sentence"])


def test_files_of_mixed_formats_are_refused(run_glue):
    with pytest.raises(ValueError, match="all be csv or all be json"):
        run_glue.DataTrainingArguments(train_file="a.csv", validation_file="b.json")


def test_task_name_and_files_together_are_refused(run_glue):
    with pytest.raises(ValueError, match="either --task_name or data files"):
        run_glue.DataTrainingArguments(task_name="sst2", train_file="a.csv")


def test_a_missing_split_is_named(run_glue):
    data = DatasetDict({"test": Dataset.from_dict({"sentence": ["a"]})})
    with pytest.raises(ValueError, match=r"needs a 'train' split; the data has \['test'\]"):
        run_glue.split(data, "train", None)
    with pytest.raises(ValueError, match=r"needs a 'label' column; the data has test: \['sentence'\]"):
        run_glue.labelled_split(data)


def test_offline_default_is_real_tweets_split_like_the_comparison(run_glue):
    data = run_glue.tweet_sentiment()
    assert {name: len(split) for name, split in data.items()} == {"train": 1500, "validation": 500, "test": 1000}
    assert data["train"].features["label"].names == ["negative", "neutral", "positive"]
    texts = {name: set(split["sentence"]) for name, split in data.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    for split in data.values():  # every class is there, and no class is most of a split
        shares = [split["label"].count(label) / len(split) for label in range(3)]
        assert min(shares) > 0.1 and max(shares) < 0.6


def test_compare_lora_prints_goat_lora_and_the_majority_rate(tmp_path, tiny_bert, run_glue, capsys):
    output_dir = tmp_path / "out"
    run_glue.main([
        *common_args(tiny_bert, output_dir), "--offline_task", "synthetic_sentiment", "--synthetic_train_samples",
        "48", "--compare_lora", "--lora_learning_rate", "1e-3", "--goat_r", "8",
    ])  # fmt: skip
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("Held-out accuracy"))
    match = re.fullmatch(
        r"Held-out accuracy on 12 validation rows: GOAT (\S+) \| LoRA \(PEFT, same total rank\) (\S+) \| "
        r"majority class 0\.500",
        line,
    )
    assert match, line
    results = json.loads((output_dir / "all_results.json").read_text())
    assert float(match.group(1)) == pytest.approx(results["eval_accuracy"], abs=5e-4)
    assert (output_dir / "goat_config.json").is_file()
    assert not (output_dir / "lora-baseline" / "goat_config.json").exists()  # the baseline saves nothing


def test_the_offline_default_records_the_bundled_base_by_its_hub_id(run_glue, tmp_path):
    """The bundled MiniLM is a folder in site-packages: goat_config.json names its Hub id, not that path."""
    model_args, data_args, _ = run_glue.parse_arguments(["--output_dir", str(tmp_path)])
    model, _ = run_glue.load_model(model_args, data_args, num_labels=3)
    get_goat_model(model, GoatConfig(r=4, num_experts=2, top_k=1))
    recorded = adapter_metadata(model)["base_model"]["name_or_path"]
    assert recorded == MINILM_HUB_ID == "sentence-transformers/all-MiniLM-L6-v2"


def test_the_printed_line_counts_the_rows_evaluated(tmp_path, tiny_bert, run_glue, capsys):
    """--max_eval_samples 5: the line names 5 rows and the majority rate of those 5, not of the whole split."""
    run_glue.main([
        *common_args(tiny_bert, tmp_path / "out"), "--offline_task", "synthetic_sentiment",
        "--synthetic_train_samples", "32", "--max_eval_samples", "5",
    ])  # fmt: skip
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("Held-out accuracy"))
    labels = run_glue.synthetic_sentiment(train_samples=32)["validation"]["label"][:5]
    majority = max(labels.count(label) for label in set(labels)) / 5
    assert re.fullmatch(rf"Held-out accuracy on 5 validation rows: GOAT \S+ \| majority class {majority:.3f}", line)
