"""Adapter-only checkpoints: saving, resuming bit-identically, the best adapter at the end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_fixtures import (
    SMALL,
    adapter_copy,
    assert_adapter_folder,
    classification_dataset,
    cpu_args,
    lm_dataset,
    single_thread,
)

from goat_hf import GoatConfig, GoatTrainer
from goat_hf.adapter_io import WEIGHTS_NAME, load_goat_adapter

TESTS = Path(__file__).parent

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


# ---- 7. checkpoints ----


def test_checkpoint_holds_the_adapter_only(make_model, tmp_path):
    model = make_model("bert-cls")
    args = cpu_args(tmp_path, save_strategy="steps", save_steps=2)
    trainer = GoatTrainer(model=model, args=args, train_dataset=classification_dataset(), goat_config=SMALL)
    trainer.train()

    tensors = assert_adapter_folder(tmp_path / "checkpoint-2", model)
    assert "classifier.weight" in tensors and "bert.embeddings.word_embeddings.weight" not in tensors
    live = adapter_copy(model)
    assert tensors.keys() == live.keys()
    assert all(torch.equal(tensors[name], live[name]) for name in live)
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        os.listdir(tmp_path / "checkpoint-2")
    )


def test_resuming_from_a_checkpoint_ends_bit_identical_to_an_uninterrupted_run(make_model, tmp_path):
    config = GoatConfig(r=8, num_experts=4, top_k=2, lora_dropout=0.1)  # dropout: the RNG state must resume too
    dataset = lm_dataset(num_examples=6)  # 3 steps per epoch: the run crosses an epoch boundary after resuming

    def run(output_dir: Path, resume: Path | None = None) -> dict[str, torch.Tensor]:
        model = make_model()
        args = cpu_args(
            output_dir, max_steps=5, save_strategy="steps", save_steps=2, learning_rate=1e-2, warmup_steps=1
        )
        trainer = GoatTrainer(model=model, args=args, train_dataset=dataset, goat_config=config)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        assert trainer.state.global_step == 5
        return adapter_copy(model)

    uninterrupted = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=tmp_path / "full" / "checkpoint-2")

    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)
    assert not os.path.exists(tmp_path / "resumed" / "checkpoint-2")  # it started from step 2, not from scratch


def test_load_best_model_at_end_restores_the_best_adapter(make_model, tmp_path):
    scores = iter([0.1, 0.9, 0.3, 0.2])  # the metric we control: checkpoint-2 is the best, checkpoint-4 the last
    model = make_model()
    args = cpu_args(
        tmp_path,
        max_steps=4,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
    )
    trainer = GoatTrainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(),
        eval_dataset=lm_dataset(2, seed=5),
        compute_metrics=lambda prediction: {"score": next(scores)},
        goat_config=SMALL,
    )
    trainer.train()

    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    best = load_file(tmp_path / "checkpoint-2" / WEIGHTS_NAME)
    last = load_file(tmp_path / "checkpoint-4" / WEIGHTS_NAME)
    live = adapter_copy(model)
    assert all(torch.equal(live[name], best[name]) for name in live)
    assert any(not torch.equal(best[name], last[name]) for name in best)


def test_save_model_writes_an_adapter_folder_with_a_model_card(make_model, tmp_path):
    model = make_model()
    trainer = GoatTrainer(model=model, args=cpu_args(tmp_path / "run"), train_dataset=lm_dataset(), goat_config=SMALL)
    trainer.train()
    folder = tmp_path / "adapter"

    trainer.save_model(str(folder))

    assert_adapter_folder(folder, model)
    assert "GOAT" in (folder / "README.md").read_text()
    fresh = load_goat_adapter(make_model(), folder)
    reloaded, live = adapter_copy(fresh), adapter_copy(model)
    assert all(torch.equal(reloaded[name], live[name]) for name in live)


def test_resuming_with_another_goat_config_is_refused(make_model, tmp_path):
    trainer = GoatTrainer(
        model=make_model(),
        args=cpu_args(tmp_path, save_strategy="steps", save_steps=1, max_steps=1),
        train_dataset=lm_dataset(),
        goat_config=SMALL,
    )
    trainer.train()
    other = GoatConfig(**{**SMALL.to_dict(), "eta": SMALL.eta * 2})
    resumed = GoatTrainer(
        model=make_model(), args=cpu_args(tmp_path, max_steps=2), train_dataset=lm_dataset(), goat_config=other
    )
    with pytest.raises(ValueError, match="another GoatConfig"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
