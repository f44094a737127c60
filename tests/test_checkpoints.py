"""Checkpoints that survive a crash: resume skips an incomplete checkpoint, and decorations never end a run."""

from __future__ import annotations

import logging
import shutil
import sys

import pytest
import torch
from conftest import tiny_llama
from trainer_fixtures import adapter_copy, cpu_args, lm_dataset, single_thread

from goat_hf import GoatConfig, GoatTrainer, load_goat_adapter
from goat_hf.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from goat_hf.checkpoints import TRAINER_STATE_NAME, checkpoint_problem

SMALL = GoatConfig(r=8, num_experts=4, top_k=2, lora_dropout=0.1)  # dropout: the RNG state must resume too
one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


def run(output_dir, resume=None, max_steps: int = 4, dataset=None) -> GoatTrainer:
    args = cpu_args(output_dir, max_steps=max_steps, save_strategy="steps", save_steps=1, learning_rate=1e-2)
    dataset = dataset or lm_dataset()
    trainer = GoatTrainer(model=tiny_llama(seed=0), args=args, train_dataset=dataset, goat_config=SMALL)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def tear_adapter(checkpoint) -> None:
    """New weights beside the old config, as a save killed between its two renames leaves them."""
    shutil.copy(checkpoint.parent / "checkpoint-2" / WEIGHTS_NAME, checkpoint / WEIGHTS_NAME)


def drop_state(checkpoint) -> None:
    """A crash after the adapter but before trainer_state.json (Trainer writes it last)."""
    (checkpoint / TRAINER_STATE_NAME).unlink()


def cut_state(checkpoint) -> None:
    path = checkpoint / TRAINER_STATE_NAME
    path.write_text(path.read_text()[:40])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return adapter_copy(run(tmp_path_factory.mktemp("full")).model)


def resumed_from_checkpoint_2(tmp_path, uninterrupted, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="goat_hf.checkpoints"):
        trainer = run(tmp_path, resume=True)
    assert f"Not resuming from {tmp_path / 'checkpoint-3'}, which is incomplete" in caplog.text
    assert trainer.state.global_step == 4
    resumed = adapter_copy(trainer.model)
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in uninterrupted)  # bit-exact from step 2
    assert checkpoint_problem(tmp_path / "checkpoint-3") is None  # rewritten when step 3 ran again


def test_a_crash_during_a_checkpoint_save_resumes_from_the_last_complete_one(
    tmp_path, uninterrupted, monkeypatch, caplog
):
    real = GoatTrainer._save_rng_state

    def crash_at_step_3(self, output_dir):
        if self.state.global_step == 3:
            raise KeyboardInterrupt("the machine went away")  # after the adapter and optimizer, before the state
        real(self, output_dir)

    monkeypatch.setattr(GoatTrainer, "_save_rng_state", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    monkeypatch.undo()
    assert "trainer_state.json is missing" in checkpoint_problem(tmp_path / "checkpoint-3")
    resumed_from_checkpoint_2(tmp_path, uninterrupted, caplog)


@pytest.mark.parametrize("damage", [drop_state, cut_state, tear_adapter], ids=["no-state", "cut-state", "torn-adapter"])
def test_resume_true_skips_an_incomplete_checkpoint_with_a_warning(tmp_path, uninterrupted, damage, caplog):
    run(tmp_path)
    shutil.rmtree(tmp_path / "checkpoint-4")  # the run ended at the damaged checkpoint-3
    damage(tmp_path / "checkpoint-3")
    assert checkpoint_problem(tmp_path / "checkpoint-3") is not None
    resumed_from_checkpoint_2(tmp_path, uninterrupted, caplog)


def test_an_explicit_incomplete_checkpoint_is_refused_with_its_reason(tmp_path):
    run(tmp_path, max_steps=1)
    drop_state(tmp_path / "checkpoint-1")
    with pytest.raises(
        ValueError, match=r"Cannot resume from .*checkpoint-1: trainer_state\.json is missing \(the save"
    ):
        run(tmp_path, resume=str(tmp_path / "checkpoint-1"))


def test_no_complete_checkpoint_says_which_were_incomplete(tmp_path):
    run(tmp_path, max_steps=1)
    (tmp_path / "checkpoint-1" / CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match=r"No complete checkpoint to resume from in .* \(incomplete: checkpoint-1\)"):
        run(tmp_path, resume=True)


def test_a_failing_model_card_never_ends_a_run(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("card template broken")

    monkeypatch.setattr("goat_hf.trainer.write_model_card", broken)
    with caplog.at_level(logging.WARNING, logger="goat_hf.trainer"):
        trainer = run(tmp_path, max_steps=2)
    assert trainer.state.global_step == 2
    assert "No model card in" in caplog.text and "RuntimeError: card template broken" in caplog.text
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None
    loaded = load_goat_adapter(tiny_llama(seed=0), tmp_path / "checkpoint-2")
    live = adapter_copy(trainer.model)
    assert all(torch.equal(tensor, live[name]) for name, tensor in adapter_copy(loaded).items())


def test_a_missing_pillow_never_ends_a_run_and_leaves_resumable_checkpoints(tmp_path, monkeypatch):
    dataset = lm_dataset()  # (datasets itself imports Pillow when it builds one)
    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` now raises ImportError
    trainer = run(tmp_path, max_steps=2, dataset=dataset)
    assert trainer.state.global_step == 2
    assert all(checkpoint_problem(tmp_path / f"checkpoint-{step}") is None for step in (1, 2))
    assert not (tmp_path / "checkpoint-2" / "routing_heatmap.png").exists()
