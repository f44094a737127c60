"""GoatGRPOTrainer and GoatGRPOConfig: TRL's GRPOTrainer (generation with transformers' `generate`) with GOAT
adapters, the balance loss, and a KL reference that costs no second copy of the model. Importing this module imports
TRL."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import GoatConfig
from .training_args import GoatTrainingArguments
from .trl_inputs import check_prompt_dataset, checked_reward
from .trl_setup import GoatReferenceArguments, GoatReferenceTrainerMixin

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("GoatGRPOTrainer needs TRL: pip install 'goat_hf[trl]'.") from error


@dataclass
class GoatGRPOConfig(GRPOConfig, GoatTrainingArguments, GoatReferenceArguments):
    """`trl.GRPOConfig` with the GOAT flags (`--goat_r`, `--aux_loss_coef`, ...) and `--goat_reference`."""


class GoatGRPOTrainer(GoatReferenceTrainerMixin, GRPOTrainer):
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
        args = self._goat_arguments(args, model, GoatGRPOConfig, "GRPO", peft_config)
        check_prompt_dataset(train_dataset, "train_dataset")
        model, reference = self._goat_policy(
            model, args, goat_config, quantization_config, with_reference=args.beta != 0
        )
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

    @property
    def card_settings(self) -> dict[str, Any]:
        """The GRPO settings the model card lists beside the training hyperparameters."""
        return {
            "method": "GRPO",
            "beta": self.beta,
            "loss_type": self.loss_type,
            "num_generations": self.num_generations,
            "reference model": self.reference_description if self.reference_mode else "none (beta 0)",
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
