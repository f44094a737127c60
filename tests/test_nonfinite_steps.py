"""A non-finite loss or gradient never reaches the adapters: the step stops with an error (default) or is skipped."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_classifier
from datasets import Dataset
from trainer_fixtures import adapter_copy, cpu_args, single_thread

from goat_hf import GoatConfig, GoatTrainer, GoatTrainingArguments

SMALL = GoatConfig(r=8, num_experts=4, top_k=2)
one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def regression_data(poison: float | None = None, row: int = 2) -> Dataset:
    """8 examples, 2 per step in order: row 2 (with `poison` as its label) lands in step 2."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (8, 8), generator=generator)
    labels = torch.randn(8, generator=generator)
    if poison is not None:
        labels[row] = poison
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def trainer_for(tmp_path, dataset: Dataset, max_steps: int = 3, **overrides) -> GoatTrainer:
    model = tiny_classifier("bert", num_labels=1, seed=0)  # regression: an MSE loss that a NaN label poisons
    args = cpu_args(
        tmp_path,
        GoatTrainingArguments,
        max_steps=max_steps,
        learning_rate=1e-2,
        train_sampling_strategy="sequential",
        **overrides,
    )
    return GoatTrainer(model=model, args=args, train_dataset=dataset, goat_config=SMALL)


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_the_poisoned_batch_really_poisons_an_unguarded_run(tmp_path):
    """Without the guard one NaN label turns the adapters NaN in one step: the tests below can fail."""
    trainer = trainer_for(tmp_path, regression_data(float("nan")), max_steps=2)
    trainer.remove_callback(trainer.nonfinite_guard)
    trainer.train()
    assert not all_finite(adapter_copy(trainer.model))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_step_stops_training_naming_the_step(tmp_path, poison):
    before_step_2 = trainer_for(tmp_path / "one-step", regression_data(), max_steps=1)
    before_step_2.train()
    trainer = trainer_for(tmp_path / "run", regression_data(poison))
    with pytest.raises(
        FloatingPointError,
        match=r"^Training step 2: the loss of 1 of its 1 batch\(es\) is (nan|inf) and the gradients of \d+ trainable "
        r"tensor\(s\) are not finite \(first: '.*'\)\. Stopped before the optimizer step.*on_nonfinite='skip'",
    ):
        trainer.train()
    assert trainer.state.global_step == 1
    weights = adapter_copy(trainer.model)
    assert all_finite(weights)
    expected = adapter_copy(before_step_2.model)  # the adapters hold exactly the weights of step 1
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_skip_mode_skips_the_step_with_a_warning_and_trains_on(tmp_path, caplog):
    clean = trainer_for(tmp_path / "clean", regression_data(), max_steps=1)
    clean.train()
    trainer = trainer_for(tmp_path / "run", regression_data(float("nan")), on_nonfinite="skip")
    with caplog.at_level(logging.WARNING, logger="goat_hf.step_guard"):
        trainer.train()
    assert trainer.state.global_step == 3 and trainer.nonfinite_guard.skipped_steps == 1
    assert "Skipped training step 2 (1 skipped so far): the loss of 1 of its 1 batch(es) is nan" in caplog.text
    assert "The adapters keep the weights of step 1." in caplog.text
    weights, after_step_1 = adapter_copy(trainer.model), adapter_copy(clean.model)
    assert all_finite(weights)
    assert any(not torch.equal(weights[name], after_step_1[name]) for name in weights)  # step 3 trained


def test_accumulated_micro_batches_are_checked_together(tmp_path):
    """With accumulation, one poisoned micro-batch of the two stops the whole optimizer step."""
    trainer = trainer_for(
        tmp_path, regression_data(float("nan"), row=3), per_device_train_batch_size=1, gradient_accumulation_steps=2
    )
    with pytest.raises(FloatingPointError, match=r"^Training step 2: the loss of 1 of its 2 batch\(es\) is nan"):
        trainer.train()
    assert all_finite(adapter_copy(trainer.model))


def test_a_finite_run_is_untouched_by_the_guard(tmp_path):
    guarded = trainer_for(tmp_path / "guarded", regression_data())
    guarded.train()
    unguarded = trainer_for(tmp_path / "unguarded", regression_data())
    unguarded.remove_callback(unguarded.nonfinite_guard)
    unguarded.train()
    a, b = adapter_copy(guarded.model), adapter_copy(unguarded.model)
    assert all(torch.equal(a[name], b[name]) for name in a)
