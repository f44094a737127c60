"""goat_hf: GOAT (LoRA Mixture-of-Experts with SVD-segment experts, ICML 2025) for the Hugging Face stack."""

from typing import Any

from .adapter_io import GoatAdapterError, save_goat_adapter
from .config import GoatConfig
from .hub import GoatHubError, load_goat_adapter, load_goat_model, push_goat_adapter, resolve_adapter_folder
from .layer import GoatLinear
from .model import (
    disable_goat,
    get_goat_model,
    goat_layers,
    keep_goat_in_fp32,
    print_trainable_parameters,
    record_routing,
    trainable_parameter_counts,
    unload_goat,
)
from .model_card import write_model_card, write_model_card_for_folder
from .prepare import prepare_for_inference
from .version import __version__

# The trainers import transformers.Trainer (and TRL), which takes seconds: import them on first use.
_LAZY = {
    "GoatTrainer": "trainer",
    "GoatTrainerMixin": "trainer",
    "GoatTrainingArguments": "training_args",
    "GoatHubMixin": "trainer_hub",
    "GoatSFTTrainer": "sft_trainer",
    "GoatSFTConfig": "sft_trainer",
    "GoatDPOTrainer": "dpo_trainer",
    "GoatDPOConfig": "dpo_trainer",
    "GoatGRPOTrainer": "grpo_trainer",
    "GoatGRPOConfig": "grpo_trainer",
    "export_for_serving": "serving",  # imports transformers' PreTrainedModel: seconds
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'goat_hf' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = [
    "__version__",
    "GoatAdapterError",
    "GoatConfig",
    "GoatDPOConfig",
    "GoatDPOTrainer",
    "GoatGRPOConfig",
    "GoatGRPOTrainer",
    "GoatHubError",
    "GoatHubMixin",
    "GoatLinear",
    "GoatSFTConfig",
    "GoatSFTTrainer",
    "GoatTrainer",
    "GoatTrainerMixin",
    "GoatTrainingArguments",
    "disable_goat",
    "export_for_serving",
    "get_goat_model",
    "goat_layers",
    "keep_goat_in_fp32",
    "load_goat_adapter",
    "load_goat_model",
    "prepare_for_inference",
    "print_trainable_parameters",
    "push_goat_adapter",
    "record_routing",
    "resolve_adapter_folder",
    "save_goat_adapter",
    "trainable_parameter_counts",
    "unload_goat",
    "write_model_card",
    "write_model_card_for_folder",
]
