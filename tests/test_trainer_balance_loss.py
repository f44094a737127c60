"""The balance loss in training: the formula, the coefficient, the router gradient, padding, evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import perturb_
from trainer_fixtures import (
    DATASETS,
    as_batch,
    balance_losses,
    cpu_args,
    lm_dataset,
    router_grads,
    single_thread,
    training_logs,
)

from goat_hf import GoatConfig, GoatLinear, GoatTrainer, goat_layers, record_routing

TESTS = Path(__file__).parent

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


# ---- 2. the balance loss: formula, coefficient, gradient ----


def routing_free_trainer(model, tmp_path, aux_loss_coef: float, **arg_overrides) -> GoatTrainer:
    """Routers at zero (uniform routing) and expert B at zero, so that the task loss does not depend on routing."""
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=aux_loss_coef)
    trainer = GoatTrainer(
        model=model, args=cpu_args(tmp_path, **arg_overrides), train_dataset=lm_dataset(), goat_config=config
    )
    with torch.no_grad():
        for layer in goat_layers(model).values():
            layer.router.weight.zero_()
            layer.expert_B.zero_()
    return trainer


def capture_inputs(model) -> dict[str, torch.Tensor]:
    """The input of every GOAT layer at its latest forward, by layer name."""
    inputs: dict[str, torch.Tensor] = {}
    for name, layer in goat_layers(model).items():
        layer.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0].detach()))
    return inputs


def formula_balance_loss(layer: GoatLinear, x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """E * sum_j f_j P_j over the tokens of x (no padding), written from the formula; differentiable in the router."""
    tokens = x.reshape(-1, layer.in_features).float()  # [T, n]
    probs = torch.softmax(tokens @ router_weight.T, dim=-1)  # [T, E]
    picks = torch.zeros_like(probs).scatter_(1, probs.detach().topk(layer.top_k, dim=-1).indices, 1.0)  # [T, E]
    return layer.num_experts * (picks.mean(0) * probs.mean(0)).sum()  # f_j = picks per token, P_j = mean prob


@pytest.mark.parametrize("coef", [0.0, 0.5], ids=["coef0", "coef0.5"])
def test_balance_loss_on_uniform_routing_is_top_k_per_layer_and_reaches_the_router(make_model, tmp_path, coef):
    model = make_model()
    trainer = routing_free_trainer(model, tmp_path, coef)
    inputs = capture_inputs(model)
    batch = as_batch(lm_dataset(num_examples=2))

    loss = trainer.compute_loss(model.train(), batch)
    per_layer = torch.stack(balance_losses(model))
    loss.backward()
    expected_grads = {}
    for name, layer in goat_layers(model).items():
        W = layer.router.weight.detach().clone().requires_grad_(True)
        (expected_grads[name],) = torch.autograd.grad(coef * formula_balance_loss(layer, inputs[name], W), W)
    with torch.no_grad():
        task = model(**batch).loss

    # Uniform routing: P_j = 1/E, so each layer gives E * sum_j f_j / E = sum_j f_j = top_k.
    torch.testing.assert_close(per_layer, torch.full((14,), 2.0))
    assert (loss - task).item() == pytest.approx(coef * 2.0 * 14, abs=1e-5)
    grads = router_grads(model)
    if coef == 0:  # the task loss does not depend on routing here: nothing else reaches the router
        assert all(torch.count_nonzero(g) == 0 for g in grads.values())
        return
    for name, grad in grads.items():
        assert expected_grads[name].abs().max() > 1e-4
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7)


def test_aux_loss_is_the_sum_of_each_layers_formula_on_uneven_routing(make_model, tmp_path):
    coef = 0.5
    model = make_model()
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=coef)
    trainer = GoatTrainer(model=model, args=cpu_args(tmp_path), train_dataset=lm_dataset(), goat_config=config)
    layers = goat_layers(model)
    perturb_(*(layer.router.weight for layer in layers.values()), std=1.0)  # peaked, uneven routing
    inputs = capture_inputs(model)
    batch = as_batch(lm_dataset(num_examples=2))

    with torch.no_grad(), record_routing(model):  # the record under no_grad is opt-in
        loss = trainer.compute_loss(model.train(), batch)
        per_layer = torch.stack(balance_losses(model))
        expected = torch.stack(
            [formula_balance_loss(layer, inputs[name], layer.router.weight) for name, layer in layers.items()]
        )
        task = model(**batch).loss

    assert expected.max() > 2.1  # uneven: uniform routing would give top_k = 2 in every layer
    torch.testing.assert_close(per_layer, expected)
    assert (loss - task).item() == pytest.approx(coef * expected.sum().item(), abs=1e-4)


def test_logged_loss_is_task_loss_plus_coef_times_aux(make_model, tmp_path):
    coef = 0.5
    trainer = routing_free_trainer(make_model(), tmp_path, coef, max_steps=1)
    trainer.train()
    (entry,) = training_logs(trainer)
    assert entry["aux_loss"] == pytest.approx(1.0)  # uniform routing: E·Σ f·P = top_k in each layer, logged / k
    assert entry["loss"] - entry["task_loss"] == pytest.approx(coef * 2.0 * 14, abs=1e-4)  # k per layer, 14 layers


# ---- 4. padding ----


def pad_right(batch: dict[str, torch.Tensor], extra: int, pad_id: int) -> dict[str, torch.Tensor]:
    rows = batch["input_ids"].shape[0]
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.full((rows, extra), pad_id)], dim=1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(rows, extra, dtype=torch.long)], dim=1),
    }
    labels = batch["labels"]
    padded["labels"] = torch.cat([labels, torch.full((rows, extra), -100)], dim=1) if labels.dim() == 2 else labels
    return padded


@pytest.mark.parametrize("kind", ["causal-lm", "bert-cls"])
def test_padding_changes_neither_the_balance_loss_nor_the_training_loss(make_model, tmp_path, kind):
    model = make_model(kind)
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=0.1)
    trainer = GoatTrainer(model=model, args=cpu_args(tmp_path), train_dataset=DATASETS[kind](), goat_config=config)
    plain = as_batch(DATASETS[kind](num_examples=2, length=6))
    padded = pad_right(plain, extra=5, pad_id=model.config.pad_token_id)
    model.train()

    with torch.no_grad(), record_routing(model):  # the record under no_grad is opt-in
        loss_plain = trainer.compute_loss(model, plain)
        aux_plain = torch.stack(balance_losses(model))
        loss_padded = trainer.compute_loss(model, padded)
        aux_padded = torch.stack(balance_losses(model))
        model(**{**padded, "attention_mask": torch.ones_like(padded["attention_mask"])})  # padding counted
        aux_unmasked = torch.stack(balance_losses(model))

    torch.testing.assert_close(aux_padded, aux_plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss_padded, loss_plain, rtol=0, atol=1e-5)
    assert (aux_unmasked - aux_plain).abs().max() > 1e-3  # padding would show if it were not excluded


# ---- 5. evaluation ----


@pytest.mark.parametrize("kind", ["causal-lm", "bert-cls"])
def test_evaluation_loss_is_the_task_loss_without_aux(make_model, tmp_path, kind):
    model = make_model(kind)
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=1.0)
    eval_dataset = DATASETS[kind](num_examples=4, seed=3)
    trainer = GoatTrainer(
        model=model,
        args=cpu_args(tmp_path, per_device_eval_batch_size=4),
        train_dataset=DATASETS[kind](),
        eval_dataset=eval_dataset,
        goat_config=config,
    )

    eval_loss = trainer.evaluate()["eval_loss"]

    batch = as_batch(eval_dataset)
    with torch.no_grad(), record_routing(model):  # the record under no_grad is opt-in
        task = model.eval()(**batch).loss.item()
        training_loss = trainer.compute_loss(model.train(), batch).item()
    assert eval_loss == pytest.approx(task, abs=1e-5)
    assert training_loss - task == pytest.approx(sum(balance_losses(model)).item(), abs=1e-4)  # coef 1
    assert training_loss - task > 1.0
