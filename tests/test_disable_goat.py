"""disable_goat gives exactly the base model, as PEFT's disable_adapter(): W0 in every layer and the base's own head."""

from __future__ import annotations

import torch
from conftest import perturb_, tiny_classifier, token_batch, train_like_

from goat_hf import GoatConfig, disable_goat, get_goat_model, goat_layers, load_goat_adapter, save_goat_adapter

SMALL = GoatConfig(r=16, num_experts=8, top_k=2)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**token_batch()).logits


def test_disable_goat_restores_the_base_head_of_a_trained_classifier():
    model = tiny_classifier("bert", seed=0)
    base = logits(model)
    get_goat_model(model, SMALL)
    train_like_(model)  # experts, routers and the task head move
    trained_head = model.classifier.weight.detach().clone()
    trained = logits(model)
    assert not torch.allclose(trained, base)
    with disable_goat(model):
        assert torch.equal(logits(model), base)
        assert not torch.equal(model.classifier.weight, trained_head)
    assert torch.equal(model.classifier.weight, trained_head)  # the trained head is back, and still trainable
    assert model.classifier.weight.requires_grad
    assert torch.equal(logits(model), trained)


def test_disable_goat_after_loading_gives_the_fresh_base(tmp_path):
    model = train_like_(get_goat_model(tiny_classifier("roberta", num_labels=3, seed=0), SMALL))
    folder = save_goat_adapter(model, tmp_path)
    fresh = tiny_classifier("roberta", num_labels=3, seed=1)  # another random head; the encoder must match
    with torch.no_grad():
        for (name, p), (_, q) in zip(
            fresh.named_parameters(), tiny_classifier("roberta", 3, seed=0).named_parameters(), strict=True
        ):
            if not name.startswith("classifier."):
                p.copy_(q)
    base = logits(fresh)
    load_goat_adapter(fresh, folder)
    assert torch.equal(logits(fresh), logits(model))
    with disable_goat(fresh):
        assert torch.equal(logits(fresh), base)


def test_training_the_head_after_disable_keeps_its_updates():
    model = train_like_(get_goat_model(tiny_classifier("bert", seed=0), SMALL))
    with disable_goat(model):
        pass
    perturb_(model.classifier.weight, seed=9)  # an optimizer step after the block updates the trained head
    moved = model.classifier.weight.detach().clone()
    with disable_goat(model):
        assert not torch.equal(model.classifier.weight, moved)
    assert torch.equal(model.classifier.weight, moved)
    assert all(layer.adapter_enabled for layer in goat_layers(model).values())
