"""Optimizer groups: experts, router (own lr, no decay), task head with and without decay."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from trainer_fixtures import (
    SMALL,
    classification_dataset,
    cpu_args,
    lm_dataset,
    single_thread,
)
from transformers import TrainingArguments

from goat_hf import GoatTrainer, GoatTrainingArguments

TESTS = Path(__file__).parent

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


# ---- 6. optimizer groups ----


def groups_by_name(trainer, model) -> dict[str, tuple[set[str], float, float]]:
    names = {id(param): name for name, param in model.named_parameters()}
    optimizer = trainer.create_optimizer()
    return {
        group["name"]: ({names[id(p)] for p in group["params"]}, group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
    }


def classifier_trainer(model, tmp_path, **arguments) -> GoatTrainer:
    """GoatTrainer on a BERT classifier: lr 1e-3, decay 0.01, r = 8 over 4 experts, plus `arguments`."""
    settings = dict(learning_rate=1e-3, weight_decay=0.01, goat_r=8, goat_num_experts=4)
    args = cpu_args(tmp_path, GoatTrainingArguments, **settings, **arguments)
    return GoatTrainer(model=model, args=args, train_dataset=classification_dataset())


def test_optimizer_groups_by_name_with_router_lr_and_no_decay_for_router_biases_and_norms(make_model, tmp_path, caplog):
    model = make_model("bert-cls")
    trainer = classifier_trainer(
        model, tmp_path, router_learning_rate=5e-3, goat_modules_to_save=["classifier", "embeddings.LayerNorm"]
    )
    caplog.set_level(logging.INFO, logger="goat_hf.trainer")

    groups = groups_by_name(trainer, model)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    experts = {name for name in trainable if name.endswith((".expert_A", ".expert_B"))}
    routers = {name for name in trainable if name.endswith(".router.weight")}
    assert list(groups) == ["experts", "router", "head", "head_no_decay"]
    assert groups["experts"] == (experts, 1e-3, 0.01)
    assert groups["router"] == (routers, 5e-3, 0.0)
    assert groups["head"] == ({"classifier.weight"}, 1e-3, 0.01)
    no_decay = {"classifier.bias", "bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"}
    assert groups["head_no_decay"] == (no_decay, 1e-3, 0.0)
    grouped = [name for names, _, _ in groups.values() for name in names]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter once, no frozen base weight
    assert len(experts) == len(routers) * 2 == 2 * (2 * 6 + 1)  # 6 Linears in each of 2 layers, and the pooler
    messages = [r.getMessage() for r in caplog.records if "GOAT optimizer groups" in r.getMessage()]
    assert len(messages) == 1 and "router:" in messages[0] and "lr 0.005" in messages[0]


@pytest.mark.parametrize("args_class", [TrainingArguments, GoatTrainingArguments], ids=["plain", "goat"])
def test_router_defaults_to_the_learning_rate_and_no_decay(make_model, tmp_path, args_class):
    model = make_model()
    args = cpu_args(tmp_path, args_class, learning_rate=2e-4, weight_decay=0.1)
    trainer = GoatTrainer(model=model, args=args, train_dataset=lm_dataset(), goat_config=SMALL)
    groups = groups_by_name(trainer, model)
    assert list(groups) == ["experts", "router"]  # lm_head is not a task head: frozen, in no group
    assert groups["experts"][1:] == (2e-4, 0.1)
    assert groups["router"][1:] == (2e-4, 0.0)


def test_head_learning_rate_sets_the_fully_trained_modules_only(make_model, tmp_path):
    model = make_model("bert-cls")
    trainer = classifier_trainer(model, tmp_path, head_learning_rate=4e-3, goat_modules_to_save=["classifier"])
    lrs = {name: lr for name, (_, lr, _) in groups_by_name(trainer, model).items()}
    assert lrs == {"experts": 1e-3, "router": 1e-3, "head": 4e-3, "head_no_decay": 4e-3}


def test_router_weight_decay_is_honoured(make_model, tmp_path):
    model = make_model()
    args = cpu_args(tmp_path, GoatTrainingArguments, weight_decay=0.1, router_weight_decay=0.05)
    trainer = GoatTrainer(model=model, args=args, train_dataset=lm_dataset(), goat_config=SMALL)
    assert groups_by_name(trainer, model)["router"][2] == 0.05


def test_optimizer_cls_and_kwargs_is_honoured_with_the_goat_groups(make_model, tmp_path):
    model = make_model()
    args = cpu_args(tmp_path, GoatTrainingArguments, learning_rate=1e-3, router_learning_rate=5e-3)
    trainer = GoatTrainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(),
        goat_config=SMALL,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    assert [(g["name"], g["lr"], g["momentum"]) for g in optimizer.param_groups] == [
        ("experts", 1e-3, 0.9),
        ("router", 5e-3, 0.9),
    ]
