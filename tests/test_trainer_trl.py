"""GoatSFTTrainer (TRL): completion-only loss, aux logs, adapter saving, accumulation by tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainer_fixtures import (
    HEALTH_KEYS,
    SMALL,
    adapter_copy,
    assert_adapter_folder,
    cpu_args,
    max_difference,
    sgd_args,
    single_thread,
    training_logs,
)
from transformers import LlamaForCausalLM

from goat_hf import GoatConfig, goat_layers

TESTS = Path(__file__).parent

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


# ---- 11. TRL ----


def word_tokenizer():
    """A 100-word whitespace tokenizer (ids match the tiny models' vocabulary), built locally: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 100)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def prompt_completion_dataset(num_examples: int = 8):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)

    def words(low: int, high: int) -> str:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return " ".join(f"w{i}" for i in torch.randint(4, 100, (length,), generator=generator).tolist())

    return Dataset.from_list([{"prompt": words(3, 6), "completion": " " + words(2, 5)} for _ in range(num_examples)])


def test_sft_trainer_trains_completion_only_logs_aux_and_saves_the_adapter(make_model, tmp_path):
    from trl import SFTConfig

    from goat_hf import GoatSFTTrainer

    tokenizer, dataset, model = word_tokenizer(), prompt_completion_dataset(), make_model()
    args = cpu_args(tmp_path / "run", SFTConfig, save_strategy="steps", save_steps=2)
    trainer = GoatSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, goat_config=SMALL
    )

    prompt_lengths = {}
    for example, row in zip(dataset, trainer.train_dataset, strict=True):
        prompt_length = len(tokenizer(example["prompt"])["input_ids"])
        completion = tokenizer(example["completion"])["input_ids"] + [tokenizer.eos_token_id]
        assert row["input_ids"][prompt_length:] == completion
        assert row["labels"] == [-100] * prompt_length + completion
        prompt_lengths[tuple(row["input_ids"])] = prompt_length
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        real = int(mask.sum())
        prompt_length = prompt_lengths[tuple(ids[:real].tolist())]
        assert (labels[:prompt_length] == -100).all() and (labels[real:] == -100).all()
        assert torch.equal(labels[prompt_length:real], ids[prompt_length:real])

    trainer.train()

    logs = training_logs(trainer)
    term = SMALL.aux_loss_coef * SMALL.top_k * len(goat_layers(model))  # the loss term over the logged aux_loss
    assert logs and all(set(HEALTH_KEYS) <= entry.keys() for entry in logs)
    assert all(
        entry["loss"] - entry["task_loss"] == pytest.approx(term * entry["aux_loss"], abs=2e-4) for entry in logs
    )
    assert_adapter_folder(tmp_path / "run" / "checkpoint-2", model)
    trainer.save_model(str(tmp_path / "adapter"))
    assert_adapter_folder(tmp_path / "adapter", model)
    assert (tmp_path / "adapter" / "README.md").is_file()


def test_sft_trainer_loads_a_model_path_and_injects_before_wrapping(make_model, tmp_path):
    from trl import SFTConfig

    from goat_hf import GoatSFTTrainer

    make_model().save_pretrained(tmp_path / "base")
    args = cpu_args(tmp_path / "run", SFTConfig, max_steps=1, bf16=False)
    trainer = GoatSFTTrainer(
        model=str(tmp_path / "base"),
        args=args,
        train_dataset=prompt_completion_dataset(4),
        processing_class=word_tokenizer(),
        goat_config=SMALL,
    )
    assert isinstance(trainer.model, LlamaForCausalLM) and trainer.model.goat_state.config == SMALL
    trainer.train()
    assert "aux_loss" in training_logs(trainer)[0]


def test_sft_accumulation_weights_micro_batches_by_their_completion_tokens(make_model, tmp_path):
    from trl import SFTConfig

    from goat_hf import GoatSFTTrainer

    tokenizer, dataset = word_tokenizer(), prompt_completion_dataset(4)
    completion_tokens = [len(tokenizer(row["completion"])["input_ids"]) for row in dataset]
    assert sum(completion_tokens[:2]) != sum(completion_tokens[2:])  # a mean of micro-batch means would differ
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=0.0)

    def step(output_dir: Path, micro_batch: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = make_model()
        args = sgd_args(output_dir, micro_batch, accumulation, args_class=SFTConfig, bf16=False)
        GoatSFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, goat_config=config
        ).train()
        return adapter_copy(model)

    accumulated = step(tmp_path / "ga", micro_batch=2, accumulation=2)
    big_batch = step(tmp_path / "big", micro_batch=4, accumulation=1)
    assert max_difference(accumulated, big_batch) < 1e-5
