"""The inference forward of a GOAT layer: the fewest PyTorch operations the maths allows.

Decoding runs one token per sequence through ~200 layers, so a GOAT layer's cost there is its count of operations,
not its arithmetic (a dozen small ops per layer made a SmolLM2-135M token 1.5x a merged LoRA's on CPU). Without
autograd nothing has to be kept for a backward, so the layer is, for tokens x [T, n]:

    hidden = [W_r; A; -c·s·A0] x              one matmul: router logits | expert activations | residual activations
    g      = softmax(top-k logits, -inf elsewhere)       the renormalised top-k weights, zero off the top-k
    y      = W0 x + b + [s·B | B0] (g ⊙ hidden[E:])      expert j's d columns scaled by g_j, in place

s is folded into B and -c·s into A0 once per weight change (the caller caches the stacked weights), so the routing
weights are a plain softmax. After `prepare_for_inference` W0 itself holds W_res = W0 - c·s·B0 A0 and shares one
buffer with [W_r; A], so a fp32 layer is one matmul in and one addmm out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def top_k_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, E] routing weights: softmax over the top-k logits (the renormalised top-k of the softmax), 0 elsewhere."""
    top_logits, top_experts = logits.topk(top_k)
    return torch.full_like(logits, float("-inf")).scatter_(1, top_experts, top_logits).softmax(-1)


def gate_experts_(experts: torch.Tensor, gates: torch.Tensor) -> None:
    """Scale expert j's d columns of `experts` [T, E*d] by gates[:, j], in place."""
    if experts.shape[1] == gates.shape[1]:  # d = 1: one column per expert
        experts.mul_(gates)
    else:
        experts.unflatten(1, (gates.shape[1], -1)).mul_(gates.unsqueeze(-1))


def stacked_inference_weights(
    router_weight: torch.Tensor,
    expert_A: torch.Tensor,
    expert_B: torch.Tensor,
    residual_A: torch.Tensor | None,
    residual_B: torch.Tensor | None,
    scaling: float,
    correction: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[W_r; A; correction·A0] ([E + r (+ r), n]) and [s·B | B0]ᵀ ([r (+ r), m], contiguous for addmm)."""
    with torch.no_grad():
        up = expert_B * scaling
        if residual_A is None:
            return torch.cat([router_weight, expert_A]), up.T.contiguous()
        projection = torch.cat([router_weight, expert_A, residual_A * correction])
        return projection, torch.cat([up, residual_B], dim=1).T.contiguous()


def adapter_delta(tokens: torch.Tensor, projection: torch.Tensor, up_t: torch.Tensor, E: int, r: int, top_k: int):
    """The adapter's [T, m] output for fp32 tokens [T, n] (residual included when `projection` has its rows)."""
    hidden = F.linear(tokens, projection)  # [T, E + r (+ r)]
    gate_experts_(hidden[:, E : E + r], top_k_gates(hidden[:, :E], top_k))
    return hidden[:, E:] @ up_t


def fused_base_forward(tokens, weight, bias, projection, up_t, E: int, r: int, top_k: int) -> torch.Tensor:
    """W0 x + b plus the adapter for fp32 tokens [T, n] and a plain fp32 base: two matmuls and an addmm."""
    out = F.linear(tokens, weight, bias)  # [T, m]
    hidden = F.linear(tokens, projection)  # [T, E + r (+ r)]
    gate_experts_(hidden[:, E : E + r], top_k_gates(hidden[:, :E], top_k))
    return out.addmm_(hidden[:, E:], up_t)


def stacked_forward(tokens, stacked, stacked_bias, up_t, m: int, E: int, top_k: int) -> torch.Tensor:
    """A prepared fp32 layer: [W_res; W_r; A] x + [b; 0] in one matmul, then one addmm with (s·B)ᵀ."""
    hidden = F.linear(tokens, stacked, stacked_bias)  # [T, m + E + r]
    gate_experts_(hidden[:, m + E :], top_k_gates(hidden[:, m : m + E], top_k))
    return torch.addmm(hidden[:, :m], hidden[:, m + E :], up_t)
