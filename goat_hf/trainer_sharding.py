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
