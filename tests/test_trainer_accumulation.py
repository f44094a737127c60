"""Gradient accumulation: micro-batches equal one big batch, the aux term scaled like the task loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_fixtures import (
    DATASETS,
    KINDS,
    adapter_copy,
    as_batch,
    balance_losses,
    max_difference,
    sgd_args,
    single_thread,
)

from goat_hf import GoatConfig, GoatTrainer, get_goat_model

TESTS = Path(__file__).parent

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


# ---- 3. gradient accumulation ----


def trainer_step(model, dataset, config, tmp_path, micro_batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    trainer = GoatTrainer(
        model=model, args=sgd_args(tmp_path, micro_batch, accumulation), train_dataset=dataset, goat_config=config
    )
    trainer.train()
    return adapter_copy(model)


def reference_step(model, dataset, config, micro_batch: int, lr: float = 1.0) -> dict[str, torch.Tensor]:
    """SGD on the task loss of the whole batch plus aux_loss_coef times the mean of the micro-batches' balance
    losses (a per-forward statistic, accumulated like a micro-batch mean loss)."""
    get_goat_model(model, config).train()
    task = model(**as_batch(dataset)).loss  # mean over the whole batch
    aux = []
    for start in range(0, len(dataset), micro_batch):
        model(**as_batch(dataset.select(range(start, start + micro_batch))))
        aux.append(sum(balance_losses(model)))
    (task + config.aux_loss_coef * torch.stack(aux).mean()).backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param -= lr * param.grad
    return adapter_copy(model)


@pytest.mark.parametrize("kind", KINDS)
def test_accumulated_micro_batches_equal_one_big_batch(make_model, tmp_path, kind):
    dataset = DATASETS[kind](num_examples=4)
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=0.0)
    start = make_model(kind)
    get_goat_model(start, config)
    start = adapter_copy(start)

    accumulated = trainer_step(make_model(kind), dataset, config, tmp_path / "ga", micro_batch=2, accumulation=2)
    big_batch = trainer_step(make_model(kind), dataset, config, tmp_path / "big", micro_batch=4, accumulation=1)

    assert max_difference(accumulated, start) > 1e-3  # a real step
    assert max_difference(accumulated, big_batch) < 1e-5


@pytest.mark.parametrize("accumulation", [1, 2], ids=["ga1", "ga2"])
@pytest.mark.parametrize("kind", KINDS)
def test_accumulation_scales_the_aux_term_like_the_task_loss(make_model, tmp_path, kind, accumulation):
    dataset = DATASETS[kind](num_examples=4)
    micro_batch = 4 // accumulation
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=0.1)

    trained = trainer_step(make_model(kind), dataset, config, tmp_path, micro_batch, accumulation)
    expected = reference_step(make_model(kind), dataset, config, micro_batch)
    without_aux = reference_step(
        make_model(kind), dataset, GoatConfig(r=8, num_experts=4, aux_loss_coef=0.0), micro_batch
    )

    assert max_difference(expected, without_aux) > 1e-3  # the aux term is visible in the update
    assert max_difference(trained, expected) < 1e-5
