"""What a GOAT layer's forward routed (the balance loss and routing-health logs read it), and who asks for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingRecord:
    """What the last forward of one layer routed: kept for the balance loss and for routing-health logs."""

    probs: torch.Tensor  # [T, E] router probabilities (detached)
    top_experts: torch.Tensor  # [T, k] indices of the picked experts
    expert_load: torch.Tensor  # [E] share of the T*k picks each expert got, over real tokens
    balance_loss: torch.Tensor  # scalar E * sum_j f_j * P_j, differentiable w.r.t. the router


class RoutingRequests:
    """How many of a model's GOAT layers record routing outside training (`record_routing`), held in one place: the
    model's padding-mask hook reads `active` rather than a flag on each layer, and under torch.compile each read is a
    guard checked before every decoded token (one a layer: ~0.25 ms a SmolLM2-135M token). A bool, not the count, so
    that the hook's compiled frame has two states, not one per count."""

    __slots__ = ("count", "active")

    def __init__(self) -> None:
        self.count, self.active = 0, False

    def add(self, change: int) -> None:
        self.count += change
        self.active = self.count > 0


def routing_record(probs: torch.Tensor, top_experts: torch.Tensor, real: torch.Tensor | None) -> RoutingRecord:
    """What a forward routed, and its balance loss E·Σ f_j·P_j over the real tokens (differentiable in the router
    probabilities [T, E]: the balance loss trains the router). `real`: [T, 1] weights, 0 for padding; None: all."""
    (T, k), E = top_experts.shape, probs.shape[1]
    if real is None:
        real, num_real = probs.new_ones(T, 1), T
    else:
        num_real = real.sum().clamp(min=1.0)
    picks = probs.new_zeros(E)  # [E] how many real tokens picked each expert
    picks.scatter_add_(0, top_experts.reshape(-1), real.expand(T, k).reshape(-1))
    f, P = picks / num_real, (probs * real).sum(0) / num_real  # [E] picks per token, mean router probability
    return RoutingRecord(
        probs=probs.detach(), top_experts=top_experts, expert_load=f.detach() / k, balance_loss=E * (f * P).sum()
    )


def real_tokens(mask: torch.Tensor | None, tokens_shape: torch.Size, probs: torch.Tensor) -> torch.Tensor | None:
    """[T, 1] weights, 0 for padding, from a token mask of this input's token shape; else None.

    The mask is matched by shape, never by element count: a [B, S] mask applies to [B, S, n] activations and,
    transposed, to sequence-first [S, B, n] ones (batch-first wins when S == B); any other input (a pooled
    [B, n], another sequence of the same size) counts every token.
    """
    if mask is None:
        return None
    if mask.shape != tokens_shape:
        if mask.dim() != 2 or mask.shape[::-1] != tokens_shape:
            return None
        mask = mask.T
    return mask.reshape(-1, 1).to(device=probs.device, dtype=probs.dtype)  # no-op from the model hook
