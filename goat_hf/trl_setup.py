"""What GoatDPOTrainer and GoatGRPOTrainer share: the `goat_reference` flag, and GoatReferenceTrainerMixin, which
checks the arguments (TRL options GOAT cannot honour are refused with the fix), loads a model given as a path, injects
GOAT and builds the reference model without a second copy, all before TRL's __init__ sees the model.
Importing this module imports TRL."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import GoatConfig
from .model import keep_goat_in_fp32
from .reference import REFERENCE_MODES, GoatReferenceModel, ReferenceMode, resolve_reference_mode
from .trainer import GoatTrainerMixin

try:
    from trl.trainer.utils import create_model_from_path
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("The GOAT DPO and GRPO trainers need TRL: pip install 'goat_hf[trl]'.") from error

logger = logging.getLogger(__name__)

REFERENCE_DESCRIPTIONS = {
    "base": "the base model (GOAT switched off with disable_goat)",
    "frozen_adapter": "the adapter the run started from, frozen (a copy of its trainable tensors)",
    "ref_model": "the ref_model passed to the trainer",
}


@dataclass
class GoatReferenceArguments:
    """The reference-model flag of GoatDPOConfig and GoatGRPOConfig."""

    goat_reference: ReferenceMode = field(
        default="auto",
        metadata={
            "help": "The reference model: 'base' = the base model (GOAT off, no copy); 'frozen_adapter' = the "
            "adapter the run starts from, frozen (e.g. an SFT adapter; costs one copy of the adapter); 'auto' = "
            "'frozen_adapter' when the model arrives with GOAT layers, else 'base'.",
            "choices": REFERENCE_MODES,
        },
    )


class GoatReferenceTrainerMixin(GoatTrainerMixin):
    """GoatTrainerMixin for TRL trainers that score with a reference model (DPO, GRPO). Their __init__ calls
    `_goat_arguments`, then `_goat_policy`, then TRL's __init__ with the policy and the reference it returns."""

    reference_mode: str | None  # "base", "frozen_adapter", "ref_model", or None where there is no reference

    def __init__(self, model: nn.Module, args: Any, *rest: Any, **kwargs: Any) -> None:
        super().__init__(model, args, *rest, **kwargs)
        keep_goat_in_fp32(self.model)  # TRL casts a quantized model's trainable parameters to bf16

    def _goat_arguments(self, args: Any, model: nn.Module | str, config_class: type, method: str, peft_config: Any):
        """`args`, or TRL's default arguments when None; refused if they ask for what GOAT cannot honour."""
        args = args if args is not None else default_args(config_class, model, method)
        refuse_unsupported(type(self).__name__, args, peft_config)
        return args

    def _goat_policy(
        self,
        model: nn.Module | str,
        args: Any,
        goat_config: GoatConfig | None,
        quantization_config: Any,
        ref_model: nn.Module | None = None,
        with_reference: bool = True,
    ) -> tuple[nn.Module, nn.Module | None]:
        """The policy (loaded if given as a path, with GOAT layers) and its reference (None without one)."""
        model = load_policy(model, args, quantization_config)
        mode = reference_mode(args, ref_model, getattr(model, "goat_state", None) is not None)
        self._inject_goat(model, args, goat_config)  # before the reference copies the adapter
        self.reference_mode = mode if with_reference else None
        return model, reference_model(model, mode, ref_model) if with_reference else None

    @property
    def reference_description(self) -> str:
        """Which reference the run uses, in words (logged, and listed in the model card)."""
        return REFERENCE_DESCRIPTIONS[self.reference_mode] if self.reference_mode else "none"


def load_policy(model: nn.Module | str, args: Any, quantization_config: Any) -> nn.Module:
    """The model, loaded from a path or Hub id with `args.model_init_kwargs` (TRL's loader) when given as a string:
    GOAT layers must exist before TRL wraps the model."""
    if not isinstance(model, str):
        if quantization_config is not None:
            raise ValueError(
                "quantization_config applies when the model is given as a path; this model is already loaded. "
                "Pass the path, or load the model quantized yourself and omit quantization_config."
            )
        return model
    init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(model, **init_kwargs)


def refuse_unsupported(trainer_name: str, args: Any, peft_config: Any) -> None:
    """TRL options that would silently do the wrong thing with GOAT: refused with what to do instead."""
    if peft_config is not None:
        raise ValueError(
            f"{trainer_name} trains GOAT adapters, not PEFT ones: drop peft_config (--use_peft) and set the adapter "
            "with goat_config=GoatConfig(...) or the --goat_* flags of the Goat config class."
        )
    if getattr(args, "sync_ref_model", False):
        raise ValueError(
            f"sync_ref_model=True needs a separate reference model to update; {trainer_name}'s reference is the "
            "base model or a frozen copy of the adapter, with nothing to synchronise. Set sync_ref_model=False."
        )
    if getattr(args, "use_vllm", False):
        raise ValueError(
            "vLLM cannot run GOAT layers (it would generate with the base model alone); set use_vllm=False to "
            "generate with transformers' generate."
        )
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise ValueError(
            f"{trainer_name} runs its reference through the policy itself and is not tested under DeepSpeed or FSDP "
            "yet; launch it with plain DDP (accelerate launch / torchrun without a DeepSpeed or FSDP config)."
        )


def reference_mode(args: Any, ref_model: nn.Module | None, model_had_goat_layers: bool) -> str:
    """Which reference a run uses: "base", "frozen_adapter" (from `args.goat_reference`) or "ref_model"."""
    flag = getattr(args, "goat_reference", "auto")
    if ref_model is None:
        return resolve_reference_mode(flag, model_had_goat_layers)
    if flag != "auto":
        raise ValueError(
            f"goat_reference={flag!r} and a ref_model were both given; pass one of them (a ref_model is a second "
            "model in memory, goat_reference needs none)."
        )
    return "ref_model"


def reference_model(model: nn.Module, mode: str, ref_model: nn.Module | None) -> nn.Module:
    """The reference TRL will call: the given ref_model, or the policy itself in the reference state (after the
    GOAT layers exist, since "frozen_adapter" copies them)."""
    logger.info("Reference model: %s.", REFERENCE_DESCRIPTIONS[mode])
    return ref_model if mode == "ref_model" else GoatReferenceModel(model, mode)


def default_args(config_class: type, model: nn.Module | str, method: str) -> Any:
    """The arguments TRL builds when none are given: output_dir "<model name>-<method>"."""
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
    return config_class(output_dir=f"{name.rstrip('/').split('/')[-1]}-{method}")
