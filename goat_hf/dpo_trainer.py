"""GoatDPOTrainer and GoatDPOConfig: TRL's DPOTrainer with GOAT adapters and a reference model that costs no second
copy of the model (DESIGN §5). Importing this module imports TRL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import GoatConfig
from .training_args import GoatTrainingArguments
from .trl_inputs import check_preference_dataset
from .trl_setup import GoatReferenceArguments, GoatReferenceTrainerMixin

try:
    from trl import DPOConfig, DPOTrainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("GoatDPOTrainer needs TRL: pip install 'goat_hf[trl]'.") from error


@dataclass
class GoatDPOConfig(DPOConfig, GoatTrainingArguments, GoatReferenceArguments):
    """`trl.DPOConfig` with the GOAT flags (`--goat_r`, `--aux_loss_coef`, ...) and `--goat_reference`.

    DPOConfig's defaults win where the two differ; a plain DPOConfig works too (GOAT's defaults, reference "auto").
    """


class GoatDPOTrainer(GoatReferenceTrainerMixin, DPOTrainer):
    """`trl.DPOTrainer` that trains GOAT adapters: change the class name in a DPO script.

    - The balance loss is added for the policy forward only; the reference forward adds none.
    - The reference log-probabilities come from the same model, with no copy: under `disable_goat` (the base model,
      bit for bit), or with the adapter the run started from swapped back in ("frozen_adapter", e.g. DPO after
      SFT); see `goat_reference`. A `ref_model` passed explicitly is used as given.
    - Checkpoints hold the adapter only and resume exactly; the model card lists the DPO settings and the reference.
    """

    def __init__(
        self,
        model: nn.Module | str,
        ref_model: nn.Module | None = None,
        args: DPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: Any = None,
        optimizers: tuple = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        *,
        goat_config: GoatConfig | None = None,
    ) -> None:
        args = self._goat_arguments(args, model, GoatDPOConfig, "DPO", peft_config)
        check_preference_dataset(train_dataset, "train_dataset")
        for name, dataset in (
            eval_dataset if isinstance(eval_dataset, dict) else {"eval_dataset": eval_dataset}
        ).items():
            check_preference_dataset(dataset, name)
        model, reference = self._goat_policy(model, args, goat_config, quantization_config, ref_model)
        super().__init__(
            model,
            args,
            goat_config=goat_config,
            ref_model=reference,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
        )

    @property
    def card_settings(self) -> dict[str, Any]:
        """The DPO settings the model card lists beside the training hyperparameters."""
        return {
            "method": "DPO",
            "beta": self.beta,
            "loss_type": ", ".join(self.loss_types),
            "reference model": self.reference_description,
        }
