"""GoatDPOTrainer (TRL): the reference log-probabilities are the base model's (or the frozen SFT adapter's) bit for
bit, the balance loss reaches the policy, reward margins grow, checkpoints resume exactly, and TRL's own dpo.py runs
with only the class name changed."""

from __future__ import annotations

import json
import runpy
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import train_like_
from datasets import Dataset
from instruct_fixtures import save_tiny_instruct_model, smollm2_tokenizer, tiny_instruct_llama
from trainer_fixtures import (
    SMALL,
    adapter_copy,
    balance_losses,
    cpu_args,
    max_difference,
    record_training_inputs,
    sgd_args,
    sgd_reference_step,
    single_thread,
    trainable_copy,
    training_logs,
)
from transformers import TrainerCallback
from trl.trainer.utils import add_fused_lm_head, hash_module

from goat_hf import disable_goat, get_goat_model, goat_layers, load_goat_adapter, save_goat_adapter
from goat_hf.dpo_trainer import GoatDPOConfig, GoatDPOTrainer
from goat_hf.reference import GoatReferenceModel

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def preference_pairs(numbers: Iterable[int]) -> list[dict[str, str]]:
    """A preference a tiny model can learn and carry over to unseen prompts: " yes" is chosen, " no" rejected."""
    return [{"prompt": f"Is {n} a number?", "chosen": " yes", "rejected": " no"} for n in numbers]


def dpo_args(output_dir: Path, **overrides) -> GoatDPOConfig:
    settings = dict(bf16=False, goat_r=8, goat_num_experts=4, learning_rate=1e-2, per_device_train_batch_size=4)
    settings.update(overrides)
    return cpu_args(output_dir, GoatDPOConfig, **settings)


def first_batch(trainer: GoatDPOTrainer, size: int = 4) -> dict[str, torch.Tensor]:
    rows = [trainer.train_dataset[i] for i in range(size)]
    return trainer.data_collator(rows)


def reference_log_probs(trainer: GoatDPOTrainer, model, batch) -> torch.Tensor:
    """TRL's own reference scoring of a batch (chosen then rejected), with `model` as the reference."""
    return torch.cat(trainer.compute_ref_log_probs(model, batch))


def plain_model(model):
    """An independent model to compare with: TRL's fused log-probability head on it, in evaluation mode."""
    add_fused_lm_head(model)
    return model.eval()


def test_reference_log_probs_are_the_base_models_bit_for_bit(tokenizer, tmp_path):
    model = tiny_instruct_llama(tokenizer, seed=3)
    trainer = GoatDPOTrainer(
        model=model, args=dpo_args(tmp_path), train_dataset=Dataset.from_list(preference_pairs(range(8))),
        processing_class=tokenizer,
    )  # fmt: skip
    assert isinstance(trainer.ref_model, GoatReferenceModel) and trainer.reference_mode == "base"
    assert not list(trainer.ref_model.parameters())  # no second copy of the model
    train_like_(model, std=0.3)  # an adapter far from the base
    model.eval()
    batch = first_batch(trainer)

    reference = reference_log_probs(trainer, trainer.ref_model, batch)
    base = reference_log_probs(trainer, plain_model(tiny_instruct_llama(tokenizer, seed=3)), batch)
    assert torch.equal(reference, base)
    policy = reference_log_probs(trainer, model, batch)
    assert not torch.allclose(policy, base, atol=1e-3)  # the adapter does change the log-probabilities
    assert all(layer.adapter_enabled for layer in goat_layers(model).values())  # switched back on
    assert torch.equal(reference_log_probs(trainer, model, batch), policy)


def test_precomputed_reference_log_probs_are_the_base_models(tokenizer, tmp_path):
    args = dpo_args(tmp_path, precompute_ref_log_probs=True)
    pairs = Dataset.from_list(preference_pairs(range(4)))
    model = tiny_instruct_llama(tokenizer, seed=3)
    get_goat_model(model, args.to_goat_config())
    train_like_(model, std=0.3)  # the precomputed values must still come from the base
    trainer = GoatDPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    assert trainer.reference_mode == "frozen_adapter"  # a model that arrives with GOAT layers keeps them as reference
    args = dpo_args(tmp_path, precompute_ref_log_probs=True, goat_reference="base")
    trainer = GoatDPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    assert trainer.reference_mode == "base"
    stored = torch.tensor(
        list(trainer.train_dataset["ref_chosen_logps"]) + list(trainer.train_dataset["ref_rejected_logps"])
    )
    base = reference_log_probs(trainer, plain_model(tiny_instruct_llama(tokenizer, seed=3)), first_batch(trainer))
    assert torch.equal(stored, base)


def test_the_cache_key_of_precomputed_log_probs_follows_the_reference(tokenizer):
    """TRL names its cache of precomputed reference log-probabilities by hashing the reference's state dict."""
    model = get_goat_model(tiny_instruct_llama(tokenizer, seed=3), SMALL)
    base, frozen = GoatReferenceModel(model, "base"), GoatReferenceModel(model, "frozen_adapter")
    keys = {"base": hash_module(base), "frozen": hash_module(frozen)}
    assert keys["base"] != keys["frozen"]
    train_like_(model)  # the adapter moves: the base reference stays what it was, the frozen one too
    assert (hash_module(base), hash_module(frozen)) == (keys["base"], keys["frozen"])
    assert hash_module(GoatReferenceModel(model, "frozen_adapter")) != keys["frozen"]  # a new snapshot, a new key


def sft_adapter(tokenizer, folder: Path):
    """A tiny model with a trained-like GOAT adapter (what SFT leaves), also saved to `folder`."""
    model = tiny_instruct_llama(tokenizer, seed=3)
    get_goat_model(model, SMALL)
    train_like_(model, std=0.3)
    save_goat_adapter(model, folder)
    return model


def test_dpo_from_an_sft_adapter_keeps_it_frozen_as_the_reference(tokenizer, tmp_path):
    model = sft_adapter(tokenizer, tmp_path / "sft")
    sft = adapter_copy(model)
    args = dpo_args(tmp_path / "run", max_steps=2)
    trainer = GoatDPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(preference_pairs(range(8))), processing_class=tokenizer
    )
    assert trainer.reference_mode == "frozen_adapter"
    trainer.train()
    assert max_difference(adapter_copy(model), sft) > 1e-3  # the policy moved away from the SFT adapter

    logs = training_logs(trainer)  # the reference pass must not wipe the policy's routing records
    term = SMALL.aux_loss_coef * SMALL.top_k * len(goat_layers(model))
    assert all(
        entry["loss"] - entry["task_loss"] == pytest.approx(term * entry["aux_loss"], abs=2e-4) for entry in logs
    )
    assert all(entry["aux_loss"] > 0.5 for entry in logs)

    model.eval()
    batch = first_batch(trainer)
    trained = reference_log_probs(trainer, model, batch)
    reference = reference_log_probs(trainer, trainer.ref_model, batch)
    frozen = plain_model(load_goat_adapter(tiny_instruct_llama(tokenizer, seed=3), tmp_path / "sft"))
    assert torch.equal(reference, reference_log_probs(trainer, frozen, batch))
    assert not torch.allclose(trained, reference, atol=1e-4)
    assert torch.equal(reference_log_probs(trainer, model, batch), trained)  # the trained tensors came back


def test_reward_margins_grow_over_a_short_run(tokenizer, tmp_path):
    args = dpo_args(tmp_path, max_steps=12, learning_rate=1e-2, per_device_eval_batch_size=8)
    trainer = GoatDPOTrainer(
        model=tiny_instruct_llama(tokenizer, seed=3), args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_list(preference_pairs(range(48))),
        eval_dataset=Dataset.from_list(preference_pairs(range(100, 116))),
    )  # fmt: skip
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert abs(before["eval_rewards/margins"]) < 0.01  # GOAT at init is the base up to the routing
    assert after["eval_rewards/margins"] > 0.3  # held-out prompts: 0.48 in 12 steps
    assert after["eval_rewards/accuracies"] == 1.0


def dpo_loss_and_balance(model, batch: dict[str, torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigmoid DPO loss of a collated batch (chosen rows, then rejected), written from the formula with the base
    (GOAT off) as reference, and the summed balance loss of the policy forward."""
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]

    def completion_log_probs() -> torch.Tensor:  # [2B]
        log_probs = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
        return (log_probs.gather(-1, ids[:, 1:, None])[..., 0] * completion[:, 1:]).sum(1)

    policy = completion_log_probs()
    balance = torch.stack(balance_losses(model)).sum()
    with torch.no_grad(), disable_goat(model):
        reference = completion_log_probs()
    chosen, rejected = (policy - reference).chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean(), balance


def test_accumulated_micro_batches_give_the_full_batch_loss_plus_the_mean_balance_loss(tokenizer, tmp_path):
    """One SGD step over 4 pairs as 2 accumulated micro-batches of 2 = the DPO loss of the 4 pairs plus aux_loss_coef
    times the mean of the micro-batches' balance losses (a per-forward statistic, averaged like a micro-batch loss).

    The bug it catches: the balance loss scaled for accumulation unlike DPO's loss. DPO declares its loss not scaled,
    so Trainer divides the returned loss, aux term included, by the accumulation steps: a mixin that divided the aux
    term itself as well would add it 2x too small (and one that marked the loss as already scaled would leave DPO's
    loss 2x too large)."""
    pairs = Dataset.from_list(preference_pairs([7, 123456, 42, 9876543210]))  # prompts of different lengths: padding
    coef = 0.005
    args = sgd_args(tmp_path, 2, 2, GoatDPOConfig, bf16=False, goat_r=8, goat_num_experts=4, aux_loss_coef=coef)
    model = tiny_instruct_llama(tokenizer, seed=3)
    trainer = GoatDPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    train_like_(model, std=0.3)  # an adapter away from the base: DPO's first step has a gradient
    start = trainable_copy(model)
    micro_batches = record_training_inputs(trainer)
    trainer.train()
    trained = trainable_copy(model)
    assert [len(batch["input_ids"]) for batch in micro_batches] == [4, 4]  # 2 pairs each: chosen and rejected rows

    def full_batch_loss(model, coef: float) -> torch.Tensor:
        losses, balances = zip(*(dpo_loss_and_balance(model, batch, args.beta) for batch in micro_batches), strict=True)
        return torch.stack(losses).mean() + coef * torch.stack(balances).mean()

    model.gradient_checkpointing_disable()  # DPOConfig turns it on; same values, and autograd.grad can run
    expected = sgd_reference_step(model.train(), start, lambda model: full_batch_loss(model, coef))
    without_aux = sgd_reference_step(model, start, lambda model: full_batch_loss(model, 0.0))
    assert max_difference(expected, without_aux) > 1e-3  # the aux term is visible in the step
    assert max_difference(trained, expected) < 1e-5


def test_resuming_gives_the_uninterrupted_run(tokenizer, tmp_path):
    """Frozen-adapter mode: a resumed trainer must take its reference from the SFT adapter, not the checkpoint."""
    pairs = Dataset.from_list(preference_pairs(range(16)))

    def run(output_dir: Path, max_steps: int, resume: str | None = None):
        model = load_goat_adapter(tiny_instruct_llama(tokenizer, seed=3), tmp_path / "sft")
        args = dpo_args(output_dir, max_steps=4, save_strategy="steps", save_steps=2, data_seed=0)
        trainer = GoatDPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
        if max_steps < 4:
            trainer.add_callback(StopAfter(max_steps))
        trainer.train(resume_from_checkpoint=resume)
        return adapter_copy(model)

    sft_adapter(tokenizer, tmp_path / "sft")
    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "halves", 2)
    checkpoint = tmp_path / "halves" / "checkpoint-2"
    assert not list(checkpoint.glob("model*.safetensors")) and (checkpoint / "goat_adapter.safetensors").is_file()
    resumed = run(tmp_path / "halves", 4, resume=str(checkpoint))
    assert max_difference(resumed, straight) == 0.0


class StopAfter(TrainerCallback):
    """Stops training after `steps` steps (after the checkpoint of that step is written)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
        return control


def test_trl_dpo_script_runs_with_only_the_class_name_changed(tmp_path, monkeypatch):
    """TRL's own trl/scripts/dpo.py, copied with `DPOTrainer` renamed to `GoatDPOTrainer` (imported from goat_hf),
    on a tiny model folder and a local JSON-lines dataset, offline."""
    import trl

    source = (Path(trl.__file__).parent / "scripts" / "dpo.py").read_text()
    assert source.count("from trl import DPOTrainer, ") == 1 and source.count("DPOTrainer(") == 1
    script = tmp_path / "dpo.py"
    script.write_text(
        source.replace("from trl import DPOTrainer, ", "from goat_hf import GoatDPOTrainer\n    from trl import ")
        .replace("DPOTrainer(", "GoatDPOTrainer(")
    )  # fmt: skip
    model_folder = save_tiny_instruct_model(tmp_path / "tiny", seed=3)
    data = tmp_path / "pairs"
    data.mkdir()
    for split, numbers in (("train", range(8)), ("test", range(100, 104))):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in preference_pairs(numbers)))
    output = tmp_path / "out"
    argv = [
        "dpo.py", "--dataset_name", str(data), "--model_name_or_path", str(model_folder), "--output_dir", str(output),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--learning_rate", "1e-3", "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps",
        "--save_steps", "2", "--logging_steps", "1", "--use_cpu", "--bf16", "false", "--report_to", "none",
        "--dtype", "float32", "--no_remove_unused_columns", "--disable_tqdm", "true",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")

    for folder in (output, output / "checkpoint-2"):
        files = {path.name for path in folder.iterdir()}
        assert {"goat_adapter.safetensors", "goat_config.json", "README.md"} <= files
        assert not files & {"model.safetensors", "adapter_model.safetensors", "pytorch_model.bin"}
    card = (output / "README.md").read_text()
    assert "| method | DPO |" in card and "| reference model | the base model (GOAT switched off" in card
    state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())
    assert any("eval_rewards/margins" in entry for entry in state["log_history"])
    assert any("aux_loss" in entry for entry in state["log_history"])
    reloaded = load_goat_adapter(tiny_instruct_llama(smollm2_tokenizer(), seed=3), output)
    assert len(goat_layers(reloaded)) == 14


# ---- bad input: each error names the problem and the fix ----


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "Hi", "answer": " yes"}], r"train_dataset has no 'chosen' and no 'rejected' column \(its columns: "
         r"prompt, answer\).*rename_column"),
        ([{"prompt": "Hi", "chosen": " yes", "refused": " no"}], r"has no 'rejected' column"),
        ([{"prompt": "Hi", "chosen": " yes", "rejected": " no"}, {"prompt": "Ho", "chosen": " ", "rejected": " no"}],
         r"train_dataset row 1 has an empty chosen completion.*dataset.filter"),
        ([{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
          "rejected": [{"role": "assistant", "content": ""}]}], r"row 0 has an empty rejected completion"),
    ],
    ids=["no-pair-columns", "no-rejected", "empty-chosen", "empty-conversational-rejected"],
)  # fmt: skip
def test_a_dataset_that_is_not_preference_pairs_is_refused(tokenizer, tmp_path, rows, message):
    model = tiny_instruct_llama(tokenizer, seed=3)
    with pytest.raises(ValueError, match=message):
        GoatDPOTrainer(model=model, args=dpo_args(tmp_path), train_dataset=Dataset.from_list(rows))
    assert not goat_layers(model)  # refused before anything was injected


def test_an_empty_eval_split_is_named(tokenizer, tmp_path):
    pairs = Dataset.from_list(preference_pairs(range(4)))
    bad = {"held_out": Dataset.from_list([{"prompt": "Hi", "chosen": "", "rejected": " no"}])}
    with pytest.raises(ValueError, match="held_out row 0 has an empty chosen completion"):
        GoatDPOTrainer(tiny_instruct_llama(tokenizer), args=dpo_args(tmp_path), train_dataset=pairs, eval_dataset=bad)


def test_options_goat_cannot_honour_are_refused_with_the_fix(tokenizer, tmp_path):
    from peft import LoraConfig

    pairs = Dataset.from_list(preference_pairs(range(4)))
    model = tiny_instruct_llama(tokenizer, seed=3)
    with pytest.raises(ValueError, match=r"not PEFT ones: drop peft_config \(--use_peft\) and set the adapter with"):
        GoatDPOTrainer(model, args=dpo_args(tmp_path), train_dataset=pairs, peft_config=LoraConfig())
    with pytest.raises(ValueError, match="sync_ref_model=True needs a separate reference model.*sync_ref_model=False"):
        GoatDPOTrainer(model, args=dpo_args(tmp_path, sync_ref_model=True), train_dataset=pairs)
    with pytest.raises(ValueError, match="goat_reference='base' and a ref_model were both given; pass one of them"):
        GoatDPOTrainer(
            model, tiny_instruct_llama(tokenizer), args=dpo_args(tmp_path, goat_reference="base"), train_dataset=pairs
        )
    with pytest.raises(ValueError, match="goat_reference='sft' is not one of 'auto', 'base', 'frozen_adapter'"):
        GoatDPOTrainer(model, args=dpo_args(tmp_path, goat_reference="sft"), train_dataset=pairs)
    assert not goat_layers(model)  # each refused before anything was injected
