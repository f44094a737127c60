"""GoatGRPOTrainer and GoatGRPOConfig: TRL's GRPOTrainer (generation with transformers' `generate`) with GOAT
adapters, the balance loss, and a KL reference that costs no second copy of the model. Importing this module imports
TRL."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import GoatConfig
from .model import keep_goat_in_fp32
from .trainer import GoatTrainerMixin
from .training_args import GoatTrainingArguments
from .trl_inputs import check_prompt_dataset, checked_reward
from .trl_setup import (
    REFERENCE_DESCRIPTIONS,
    GoatReferenceArguments,
    default_args,
    load_policy,
    reference_mode,
    reference_model,
    refuse_unsupported,
)

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("GoatGRPOTrainer needs TRL: pip install 'goat_hf[trl]'.") from error


@dataclass
class GoatGRPOConfig(GRPOConfig, GoatTrainingArguments, GoatReferenceArguments):
    """`trl.GRPOConfig` with the GOAT flags (`--goat_r`, `--aux_loss_coef`, ...) and `--goat_reference`."""


class GoatGRPOTrainer(GoatTrainerMixin, GRPOTrainer):
    """`trl.GRPOTrainer` that trains GOAT adapters, generating with transformers' `generate` (vLLM cannot run GOAT
    layers, so `use_vllm` is refused).

    - The balance loss is added for the policy forward of the loss only (generation and scoring add none).
    - With beta > 0 the KL reference is the same model under `disable_goat` (or the frozen starting adapter, see
      `goat_reference`); TRL would otherwise load a second copy.
    - Custom reward functions are checked: one reward per completion, none NaN.
    - Checkpoints hold the adapter only.
    """

    def __init__(
        self,
        model: nn.Module | str,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: Any = None,
        optimizers: tuple = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: Any = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
        *,
        goat_config: GoatConfig | None = None,
    ) -> None:
        args = args if args is not None else default_args(GoatGRPOConfig, model, "GRPO")
        refuse_unsupported(type(self).__name__, args, peft_config)
        if getattr(args, "use_vllm", False):
            raise ValueError(
                "vLLM cannot run GOAT layers (it would generate with the base model alone); set use_vllm=False to "
                "generate with transformers' generate."
            )
        check_prompt_dataset(train_dataset, "train_dataset")
        model = load_policy(model, args, quantization_config)
        mode = reference_mode(args, None, getattr(model, "goat_state", None) is not None)
        self._inject_goat(model, args, goat_config)  # before the reference copies the adapter
        reference = reference_model(model, mode, None) if args.beta != 0.0 else None
        beta = args.beta
        args.beta = 0.0  # GRPOTrainer takes no ref_model: with beta 0 it loads none, and the reference is set below
        try:
            super().__init__(
                model,
                args,
                goat_config=goat_config,
                reward_funcs=_checked_rewards(reward_funcs),
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                reward_processing_classes=reward_processing_classes,
                callbacks=callbacks,
                optimizers=optimizers,
                tools=tools,
                rollout_func=rollout_func,
                environment_factory=environment_factory,
            )
        finally:
            args.beta = beta
        self.args.beta = self.beta = beta  # the Trainer may hold a copy of the arguments (GoatHubMixin)
        self.ref_model = reference
        self.reference_mode = mode if reference is not None else None
        keep_goat_in_fp32(self.model)  # GRPOTrainer casts a quantized model's trainable parameters to bf16

    @property
    def card_settings(self) -> dict[str, Any]:
        """The GRPO settings the model card lists beside the training hyperparameters."""
        return {
            "method": "GRPO",
            "beta": self.beta,
            "loss_type": self.loss_type,
            "num_generations": self.num_generations,
            "reference model": REFERENCE_DESCRIPTIONS[self.reference_mode] if self.reference_mode else "none (beta 0)",
        }


def _checked_rewards(reward_funcs: Any) -> Any:
    """Wrap the plain (synchronous, Python) reward functions in the NaN and length check; leave reward models (a
    model or its id) and async functions as they are."""
    if reward_funcs is None:
        return None
    functions = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
    return [
        checked_reward(function)
        if callable(function) and not isinstance(function, nn.Module) and not inspect.iscoroutinefunction(function)
        else function
        for function in functions
    ]
