"""Adapter-only checkpoints under FSDP and DeepSpeed: what Trainer would save in full, GoatTrainer saves as an adapter.

Under FSDP and DeepSpeed, Trainer.save_model gathers the whole model's state dict (base weights included) before
calling `_save`, or skips `_save` altogether (FSDP with SHARDED_STATE_DICT), and each checkpoint also gets the
sharded model (FSDP's `pytorch_model_fsdp_0`, DeepSpeed's module states with the frozen weights). GOAT's base is
frozen and rebuilt from the base model, so here every rank calls `_save` (which gathers the adapter only, see
distributed.py) and the checkpoint adds just the optimizer state: FSDP's optimizer.bin, or DeepSpeed's engine
checkpoint without the frozen parameters, which resuming then loads non-strictly (Trainer does so for PEFT only).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate.utils import save_fsdp_optimizer
from transformers.trainer import SCHEDULER_NAME


class GoatShardedCheckpointMixin:
    """Mixed into GoatTrainerMixin; a no-op without FSDP or DeepSpeed."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir or self.args.output_dir)  # on every rank: the adapter is gathered collectively
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_deepspeed_enabled:
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            if self._deepspeed_owns_scheduler():
                return
        elif self.is_fsdp_enabled:
            plugin = self.accelerator.state.fsdp_plugin
            save_fsdp_optimizer(plugin, self.accelerator, self.optimizer, self.model, output_dir)
        else:
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _deepspeed_owns_scheduler(self) -> bool:
        from accelerate.utils import DeepSpeedSchedulerWrapper

        return isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper)

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None):
        if self.is_fsdp_enabled:  # before accelerate shards the model: every rank raises, none waits
            refuse_fsdp_parameter_cast(self.accelerator.state.fsdp_plugin)
        if self.is_deepspeed_enabled:
            refuse_deepspeed_half_precision(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        if not (self.is_deepspeed_enabled and resume_from_checkpoint is not None):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        # Trainer would load strictly and fail on the frozen weights the checkpoint leaves out
        load_path, _ = self.model_wrapped.load_checkpoint(
            resume_from_checkpoint, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise ValueError(f"{resume_from_checkpoint} holds no DeepSpeed checkpoint (a global_step* folder).")
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader


def refuse_fsdp_parameter_cast(plugin: Any) -> None:
    """FSDP mixed precision casts every parameter of a unit, GOAT's included, to its param_dtype for compute; the
    GOAT layer computes its experts and router in fp32 (DESIGN), so the first forward would fail on a dtype mismatch
    deep in the model. Say what works instead: a bf16 base with fp32 adapters and no FSDP cast."""
    param_dtype = getattr(getattr(plugin, "mixed_precision_policy", None), "param_dtype", None)
    if param_dtype not in (None, torch.float32):
        raise ValueError(_half_precision_message(f"FSDP mixed precision (param_dtype={param_dtype})", "FSDP"))


def refuse_deepspeed_half_precision(config: dict) -> None:
    """DeepSpeed's bf16 / fp16 mode casts the whole module, GOAT's adapters included (same failure as above)."""
    for key in ("bf16", "fp16"):
        if str(config.get(key, {}).get("enabled", False)).lower() == "true":
            raise ValueError(_half_precision_message(f"DeepSpeed {key} (`{key}.enabled`)", "DeepSpeed"))


def _half_precision_message(what: str, backend: str) -> str:
    return (
        f"{what} would cast GOAT's fp32 adapters and routers to half precision, and GOAT layers compute in fp32 "
        "(the first forward would fail on a dtype mismatch). Load the base in bf16 instead (from_pretrained(..., "
        'dtype=torch.bfloat16), or --model_init_kwargs \'{"dtype": "bfloat16"}\' in the examples) and turn mixed '
        f"precision off (--bf16 false, accelerate config `mixed_precision: 'no'`): the base then computes in bf16 "
        f"and GOAT keeps its adapters in fp32 under {backend}."
    )
