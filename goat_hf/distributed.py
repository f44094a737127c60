"""Whole tensors from sharded training: FSDP2 DTensors and DeepSpeed ZeRO-3 partitioned parameters.

Under FSDP2 (`fully_shard`) every parameter is a DTensor holding 1/world_size of the rows on each rank; under
ZeRO-3 a parameter is an empty placeholder whose data lives in DeepSpeed's partitions. The adapter format
holds whole tensors, so reading a tensor for the adapter file gathers it, and writing one from the file puts
each rank's part back. Both are collectives: every rank must make the same calls in the same order (the
Trainer calls `_save` and the loaders on every rank). Plain tensors, DDP and ZeRO-1/2 pass straight through.
One tensor is gathered at a time, so memory stays bounded by the largest layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DeepSpeed ZeRO-3 parameter (its data is partitioned across the ranks)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_status")


def _zero3_gathered(tensor: torch.Tensor, modifier_rank: int | None = None):
    if not is_zero3_partitioned(tensor):
        return nullcontext()
    import deepspeed  # only a ZeRO-3 parameter gets here, so deepspeed is installed

    return deepspeed.zero.GatheredParameters([tensor], modifier_rank=modifier_rank)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached, on the CPU, whatever sharding holds it (a copy when it was sharded)."""
    if isinstance(tensor, DTensor):
        return tensor.detach().full_tensor().cpu()
    with _zero3_gathered(tensor):
        return tensor.detach().cpu().clone() if is_zero3_partitioned(tensor) else tensor.detach().cpu()


@contextmanager
def gathered(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The whole tensor, detached, on its own device, while the block runs (no copy of a plain tensor)."""
    if isinstance(tensor, DTensor):
        yield tensor.detach().full_tensor()
        return
    with _zero3_gathered(tensor):
        yield tensor.detach()


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The whole tensor's shape (a DTensor's is already global; a ZeRO-3 placeholder is empty)."""
    return torch.Size(tensor.ds_shape) if is_zero3_partitioned(tensor) else tensor.shape


def live_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with each parameter and buffer as the live object, not state_dict's detached copy:
    ZeRO-3 marks the parameter objects, and gathering needs those marks.

    state_dict() runs first: under FSDP2 its pre-hook reshards a module left unsharded (the root after a
    forward without backward, e.g. an evaluation) and frees the unsharded parameters' storage; read before it,
    they would be the freed tensors (reading them crashed the process with SIGSEGV)."""
    state = module.state_dict()
    live = dict(module.named_buffers(remove_duplicate=False)) | dict(module.named_parameters(remove_duplicate=False))
    return {key: live.get(key, value) for key, value in state.items()}


@torch.no_grad()
def copy_full_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor `value` into `target`, which may be sharded: each rank keeps its own part.

    Every rank must pass the same `value` (all ranks read the same adapter file).
    """
    if isinstance(target, DTensor):
        value = value.to(device=target.to_local().device, dtype=target.dtype)
        # src_data_rank=None: each rank cuts its part from its own copy, no broadcast needed
        target.copy_(distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None))
        return
    with _zero3_gathered(target, modifier_rank=0):
        target.copy_(value)


def require_whole_weights(linears: dict[str, nn.Module]) -> None:
    """Refuse layers whose weight is already sharded: GOAT's SVD init needs each W0 whole."""
    for name, linear in linears.items():
        weight = getattr(linear, "weight", None)
        if isinstance(weight, DTensor):
            kind = "an FSDP2 / tensor-parallel DTensor"
        elif is_zero3_partitioned(weight):
            kind = "a DeepSpeed ZeRO-3 partition (the model was loaded under zero.Init)"
        else:
            continue
        raise ValueError(
            f"Layer {name!r} has a sharded weight, {kind}; GOAT's SVD init needs whole weights. Inject before "
            "sharding: load the model unsharded (accelerate config `zero3_init_flag: false`, or build "
            "TrainingArguments after from_pretrained) and let GoatTrainer inject; accelerate shards it at prepare."
        )
