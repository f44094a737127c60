"""Activation checkpointing: reentrant refused or warned about, non-reentrant keeps the aux gradient."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from trainer_fixtures import (
    SMALL,
    cpu_args,
    lm_dataset,
    max_difference,
    router_grads,
    single_thread,
)
from transformers import TrainerCallback

from goat_hf import GoatConfig, GoatTrainer, goat_layers

TESTS = Path(__file__).parent

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


# ---- 8. activation checkpointing ----


@pytest.mark.parametrize("spelling", ["gradient_checkpointing", "activation_checkpointing"])
def test_reentrant_activation_checkpointing_with_aux_loss_is_refused(make_model, tmp_path, spelling):
    args = cpu_args(tmp_path, **{spelling: True, f"{spelling}_kwargs": {"use_reentrant": True}})
    refused = make_model()
    with pytest.raises(ValueError, match="use_reentrant"):
        GoatTrainer(model=refused, args=args, train_dataset=lm_dataset(), goat_config=SMALL)
    assert not goat_layers(refused)  # refused before injecting: the model is left as it was
    GoatTrainer(
        model=make_model(),
        args=args,
        train_dataset=lm_dataset(),  # no aux loss: nothing to lose
        goat_config=GoatConfig(r=8, num_experts=4, aux_loss_coef=0.0),
    )


def test_reentrant_checkpointing_enabled_on_the_model_warns_that_the_aux_gradient_is_lost(make_model, tmp_path, caplog):
    model = make_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = GoatTrainer(
        model=model, args=cpu_args(tmp_path, max_steps=2), train_dataset=lm_dataset(), goat_config=SMALL
    )
    with caplog.at_level(logging.WARNING, logger="goat_hf.trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "no gradient path to the routers" in r.getMessage()]
    assert len(warnings) == 1 and "use_reentrant=False" in warnings[0]  # once, naming the fix


class RouterGradients(TrainerCallback):
    """Keeps each GOAT layer's router gradient just before the first optimizer step."""

    def __init__(self, model) -> None:
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = router_grads(self.model)


def first_router_grads(model, tmp_path, aux_loss_coef: float, **checkpointing) -> dict[str, torch.Tensor]:
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=aux_loss_coef)
    callback = RouterGradients(model)
    args = cpu_args(tmp_path, max_steps=1, max_grad_norm=0.0, **checkpointing)
    GoatTrainer(model=model, args=args, train_dataset=lm_dataset(), goat_config=config, callbacks=[callback]).train()
    return callback.grads


@pytest.mark.parametrize("kwargs", [{"use_reentrant": False}, None], ids=["non-reentrant", "default"])
def test_non_reentrant_checkpointing_keeps_the_aux_gradient(make_model, tmp_path, kwargs):
    checkpointing = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": kwargs}
    checkpointed = first_router_grads(make_model(), tmp_path / "ckpt", 0.1, **checkpointing)
    plain = first_router_grads(make_model(), tmp_path / "plain", 0.1)
    no_aux = first_router_grads(make_model(), tmp_path / "no_aux", 0.0, **checkpointing)

    assert max_difference(checkpointed, plain) < 1e-6
    assert max_difference(checkpointed, no_aux) > 1e-4
