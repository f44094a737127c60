"""Model cards written by GoatTrainer: Hub metadata read back with huggingface_hub's own ModelCard, the title link,
local bases and data, and the heatmap skipped without Pillow."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from huggingface_hub import ModelCard
from trainer_fixtures import classification_dataset, cpu_args, single_thread

from goat_hf import GoatConfig, GoatTrainer
from goat_hf.model_card import CARD_NAME, HEATMAP_NAME
from goat_hf.version import __version__

HUB_BASE = "sentence-transformers/all-MiniLM-L6-v2"

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def trained(classifier_factory, tmp_path, name_or_path: str) -> GoatTrainer:
    """Two steps on a tiny BERT whose config claims `name_or_path` as its origin, evaluated once at the end."""
    model = classifier_factory("bert")
    model.config._name_or_path = name_or_path
    data = classification_dataset()
    args = cpu_args(tmp_path / "out", eval_strategy="steps", eval_steps=2)
    trainer = GoatTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=accuracy,
        goat_config=GoatConfig(r=4, num_experts=2, top_k=1),
    )
    trainer.train()
    return trainer


def test_card_for_a_hub_base_has_the_hub_metadata_and_links_the_base(classifier_factory, tmp_path):
    trainer = trained(classifier_factory, tmp_path, HUB_BASE)
    trainer.create_model_card(license="apache-2.0", dataset_name="nyu-mll/glue", tags="sst2")

    card = ModelCard.load(tmp_path / "out" / CARD_NAME)
    data = card.data
    logged = next(entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry)
    assert data.base_model == HUB_BASE
    assert data.library_name == "goat_hf"
    assert {"goat", "moe", "text-classification", "sst2"} <= set(data.tags)
    assert data.datasets == ["nyu-mll/glue"]
    assert data.license == "apache-2.0"
    [result] = data.eval_results  # eval_loss is no score for the model-index
    assert (result.task_type, result.dataset_type, result.dataset_name) == (
        "text-classification",
        "nyu-mll/glue",
        "nyu-mll/glue",
    )
    assert (result.metric_type, result.metric_value) == ("accuracy", logged)
    assert f"[{HUB_BASE}](https://huggingface.co/{HUB_BASE})" in card.text
    assert "(#)" not in card.text
    assert 'load_goat_model("<this repo id or folder>")  # loads the base recorded in goat_config.json' in card.text
    assert f"- goat_hf {__version__}\n" in card.text  # the code that wrote it, whatever pip installed


def test_card_for_a_local_base_and_local_data_says_so(classifier_factory, tmp_path):
    base_folder = tmp_path / "my-base"
    base_folder.mkdir()
    trainer = trained(classifier_factory, tmp_path, str(base_folder))
    trainer.create_model_card(dataset_name="generated sentiment sentences")

    card = ModelCard.load(tmp_path / "out" / CARD_NAME)
    assert card.data.base_model is None
    assert card.data.datasets is None  # words are no Hub dataset id
    assert card.data.eval_results[0].dataset_type == "local"
    assert card.data.eval_results[0].dataset_name == "generated sentiment sentences"
    assert "base model loaded from a local folder" in card.text
    assert "Trained and evaluated on local data: generated sentiment sentences." in card.text
    assert str(base_folder) not in card.text and "(#)" not in card.text
    # goat_config.json records no base for a local one, so the usage names it
    assert 'load_goat_model("<this repo id or folder>", base_model="<base model id or folder>")' in card.text


def test_card_for_a_local_copy_named_by_its_hub_id_says_to_pass_the_base(classifier_factory, tmp_path):
    base_folder = tmp_path / "my-copy"
    base_folder.mkdir()
    trainer = trained(classifier_factory, tmp_path, str(base_folder))
    trainer.create_model_card(finetuned_from=HUB_BASE)

    card = ModelCard.load(tmp_path / "out" / CARD_NAME)
    assert card.data.base_model == HUB_BASE
    assert f'load_goat_model("<this repo id or folder>", base_model="{HUB_BASE}")' in card.text
    assert f'AutoTokenizer.from_pretrained("{HUB_BASE}")' in card.text


def test_without_pillow_the_card_keeps_the_table_and_says_why_there_is_no_heatmap(
    classifier_factory, tmp_path, monkeypatch, caplog
):
    trainer = trained(classifier_factory, tmp_path, HUB_BASE)
    monkeypatch.setitem(sys.modules, "PIL", None)
    caplog.set_level("INFO", logger="goat_hf.model_card")
    trainer.create_model_card()

    text = (tmp_path / "out" / CARD_NAME).read_text()
    assert not (tmp_path / "out" / HEATMAP_NAME).exists()
    assert (
        "The routing heatmap needs Pillow: pip install pillow (or goat_hf[heatmap]); this card has the table only"
        in (text)
    )
    assert "| bert.encoder.layer.0.attention.self.query |" in text
    assert "has the load table only" in caplog.text
