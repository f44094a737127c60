"""GoatSFTTrainer and GoatSFTConfig: TRL's SFTTrainer with GOAT adapters (DESIGN §5). Importing this module
imports TRL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .model import keep_goat_in_fp32
from .trainer import GoatTrainerMixin
from .training_args import GoatTrainingArguments

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("GoatSFTTrainer needs TRL: pip install 'goat_hf[trl]'.") from error


@dataclass
class GoatSFTConfig(SFTConfig, GoatTrainingArguments):
    """`trl.SFTConfig` with the GOAT flags of GoatTrainingArguments (`--goat_r`, `--aux_loss_coef`, ...).

    SFTConfig's defaults win where the two differ (learning_rate 2e-5, logging_steps 10, bf16 unless fp16,
    gradient_checkpointing on); `to_goat_config()` gives the GoatConfig, validated when the config is built.
    """


class GoatSFTTrainer(GoatTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` that trains GOAT adapters.

    The balance loss comes from the GOAT layers' slots: TRL's fused LM head returns no logits, and TRL's own
    `router_aux_loss_coef` is for MoE base models (it raises on others), so leave it off.
    """

    def __init__(self, model: nn.Module | str, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        if isinstance(model, str):  # GOAT layers must exist before SFTTrainer wraps the model
            from transformers import AutoModelForCausalLM

            init_kwargs = getattr(args, "model_init_kwargs", None) or {}
            model = AutoModelForCausalLM.from_pretrained(model, **init_kwargs)
        super().__init__(model, args, *rest, **kwargs)
        keep_goat_in_fp32(self.model)  # SFTTrainer casts a quantized model's trainable parameters to bf16

    def _loss_uses_num_items_in_batch(self, model: nn.Module) -> bool:
        return True  # SFTTrainer divides its token loss by num_items_in_batch itself
