"""Helpers shared by the trainer tests and the DDP worker: offline CPU training arguments and tiny datasets."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the Hub (DESIGN §6)

import torch  # noqa: E402
from conftest import VOCAB  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch import nn  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from goat_hf.adapter_io import adapter_state_dict  # noqa: E402


def single_thread() -> Iterator[None]:
    """Use as a module fixture: the CI machine is shared, and one intra-op thread is ~20x faster there than two
    threads fighting over two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_args(output_dir, args_class: type = TrainingArguments, **overrides) -> TrainingArguments:
    """Offline CPU arguments for a few quick steps: no reporting, no saving, a log line every step."""
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=2,
        seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return args_class(**settings)


def lm_dataset(num_examples: int = 8, length: int = 8, seed: int = 0) -> Dataset:
    """Causal-LM examples of equal length, no padding: every micro-batch has the same number of label tokens."""
    ids = torch.randint(3, VOCAB, (num_examples, length), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    )


def classification_dataset(num_examples: int = 8, length: int = 8, num_labels: int = 2, seed: int = 0) -> Dataset:
    """Sequence-classification examples of equal length with labels in [0, num_labels)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (num_examples, length), generator=generator)
    labels = torch.randint(0, num_labels, (num_examples,), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def as_batch(dataset: Dataset) -> dict[str, torch.Tensor]:
    """The whole dataset as one batch of tensors."""
    return {name: torch.tensor(dataset[name]) for name in dataset.column_names}


def adapter_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of everything an adapter file holds (experts, routers, residual factors, task head)."""
    return {name: tensor.detach().clone() for name, tensor in adapter_state_dict(model).items()}
