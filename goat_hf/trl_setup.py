"""What GoatDPOTrainer and GoatGRPOTrainer share: the `goat_reference` flag, a model given as a path, the
reference model without a second copy, and the settings TRL's options GOAT cannot honour are refused with.
Importing this module imports TRL."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .reference import REFERENCE_MODES, GoatReferenceModel, ReferenceMode, resolve_reference_mode

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
