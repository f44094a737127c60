"""Keep a non-finite loss or gradient from ever reaching the adapters (GoatTrainer's `on_nonfinite`).

One NaN or inf in one batch turns every trainable tensor NaN in a single optimizer step, and Trainer's logs
hide it (`logging_nan_inf_filter` replaces a NaN loss by the running mean). This callback looks at the step's
losses and gradients right before the optimizer step: "stop" (the default) raises an error naming the step,
"skip" drops that step's gradients with a warning, so the adapters keep the weights of the step before.
Costs one device sync per optimizer step. Under fp16 loss scaling an inf gradient is routine (the GradScaler
skips that step and lowers the scale), so only the loss is checked there.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

NonFiniteMode = Literal["stop", "skip"]
NONFINITE_MODES: tuple[str, ...] = ("stop", "skip")


class NonFiniteGuard(TrainerCallback):
    """Checks each optimizer step of `trainer`; `record_loss` is fed every micro-batch's loss by training_step."""

    def __init__(self, trainer: Any, mode: NonFiniteMode = "stop") -> None:
        check_nonfinite_mode(mode)
        self.trainer, self.mode = trainer, mode
        self.losses: list[torch.Tensor] = []
        self.skipped_steps = 0

    def record_loss(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach().float().reshape(()))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        losses, self.losses = self.losses, []
        trainer = self.trainer
        check_grads = trainer.accelerator.scaler is None
        named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad and p.grad is not None]
        grads = [_local(p.grad) for _, p in named] if check_grads else []
        device = trainer.accelerator.device
        flags = torch.zeros(2, device=device)
        if losses:
            flags[0] = (~torch.stack([loss.to(device) for loss in losses]).isfinite()).any().float()
        if grads:
            norms = torch.stack([norm.to(device) for norm in torch._foreach_norm(grads)])
            flags[1] = (~norms.isfinite()).any().float()
        if trainer.accelerator.num_processes > 1:
            flags = trainer.accelerator.reduce(flags, reduction="sum")  # every rank takes the same decision
        bad_loss, bad_grads = (flags > 0).tolist()  # the one sync
        if not (bad_loss or bad_grads):
            return
        step = state.global_step + 1
        what = _describe(losses, named if bad_grads else [])
        if self.mode == "stop":
            raise FloatingPointError(
                f"Training step {step}: {what}. Stopped before the optimizer step, so the adapters (and the last "
                "checkpoint) keep finite weights. Look for inf/NaN in this step's batch, or lower the learning rate "
                "(fp16 overflow: try bf16); or pass on_nonfinite='skip' (--on_nonfinite skip) to skip such steps."
            )
        self.skipped_steps += 1
        logger.warning(
            "Skipped training step %d (%d skipped so far): %s. The adapters keep the weights of step %d.",
            step,
            self.skipped_steps,
            what,
            step - 1,
        )
        if check_grads:  # under a GradScaler the scaler itself skips a step with non-finite gradients
            for _, param in named:
                param.grad = None


def check_nonfinite_mode(mode: str) -> None:
    if mode not in NONFINITE_MODES:
        raise ValueError(f"on_nonfinite={mode!r} is unknown; choose 'stop' (raise) or 'skip' (warn and skip).")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor gradient (FSDP2); the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _describe(losses: list[torch.Tensor], named: list[tuple[str, torch.nn.Parameter]]) -> str:
    parts = []
    bad_losses = [loss.item() for loss in losses if not torch.isfinite(loss)]
    if bad_losses:
        parts.append(f"the loss of {len(bad_losses)} of its {len(losses)} batch(es) is {bad_losses[0]}")
    bad = [name for name, p in named if not bool(torch.isfinite(_local(p.grad)).all())]
    if bad:
        parts.append(f"the gradients of {len(bad)} trainable tensor(s) are not finite (first: {bad[0]!r})")
    return " and ".join(parts) or "a non-finite value on another process"
