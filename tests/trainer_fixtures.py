"""Helpers shared by the trainer tests and the DDP worker: offline CPU training arguments and tiny datasets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the Hub (DESIGN §6)

import torch  # noqa: E402
from conftest import VOCAB  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from goat_hf import GoatConfig, goat_layers  # noqa: E402
from goat_hf.adapter_io import (  # noqa: E402
    CONFIG_NAME,
    LAYER_TENSORS,
    RESIDUAL_TENSORS,
    WEIGHTS_NAME,
    adapter_state_dict,
)

FULL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
HEALTH_KEYS = ("aux_loss", "task_loss", "router_load_min", "router_load_max", "router_load_entropy")
SMALL = GoatConfig(r=8, num_experts=4, top_k=2)  # d = 2: cheaper than the paper defaults where they do not matter
KINDS = ("causal-lm", "bert-cls", "roberta-cls")


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


DATASETS = {"causal-lm": lm_dataset, "bert-cls": classification_dataset, "roberta-cls": classification_dataset}


def training_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def balance_losses(model) -> list[torch.Tensor]:
    return [layer.routing.balance_loss for layer in goat_layers(model).values()]


def router_grads(model) -> dict[str, torch.Tensor]:
    return {
        name: layer.router.weight.grad.clone() if layer.router.weight.grad is not None else torch.zeros(1)
        for name, layer in goat_layers(model).items()
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def sgd_args(tmp_path, micro_batch: int, accumulation: int, args_class: type = TrainingArguments, **overrides):
    """One plain SGD step (no clipping, no decay, constant lr) over the dataset in order."""
    return cpu_args(
        tmp_path,
        args_class,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=1,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        train_sampling_strategy="sequential",
        **overrides,
    )


def record_training_inputs(trainer) -> list[dict[str, torch.Tensor]]:
    """The micro-batches the trainer's compute_loss receives in training, in order (filled as it trains)."""
    seen: list[dict[str, torch.Tensor]] = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        if model.training:
            seen.append(inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return seen


def trainable_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def sgd_reference_step(model: nn.Module, start: dict[str, torch.Tensor], loss_fn, lr: float = 1.0) -> dict:
    """One SGD step written out: the trainable tensors set back to `start`, then start - lr * grad(loss_fn(model))."""
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(start[name])
    grads = torch.autograd.grad(loss_fn(model), list(params.values()), allow_unused=True)
    return {
        name: start[name] - lr * grad if grad is not None else start[name]
        for name, grad in zip(params, grads, strict=True)
    }


def assert_adapter_folder(folder: Path, model) -> dict[str, torch.Tensor]:
    """The folder holds goat_config.json and goat_adapter.safetensors, no full weights, no base tensors."""
    files = set(os.listdir(folder))
    assert {CONFIG_NAME, WEIGHTS_NAME} <= files
    assert not files & set(FULL_WEIGHT_FILES)
    tensors = load_file(folder / WEIGHTS_NAME)
    heads = tuple(f"{head}." for head in model.goat_state.modules_to_save)
    adapter_suffixes = tuple(f".{name}" for name in LAYER_TENSORS + RESIDUAL_TENSORS)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for key in tensors:
        assert key.endswith(adapter_suffixes) or key.startswith(heads), key
        assert key not in frozen, key
    return tensors
