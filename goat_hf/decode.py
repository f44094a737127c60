"""The inference forward of a GOAT layer: the fewest PyTorch operations the maths allows.

Decoding runs one token per sequence through ~200 layers, so a GOAT layer's cost there is its count of operations
and of Python attribute lookups, not its arithmetic (a dozen small ops per layer made a SmolLM2-135M token 1.5x a
merged LoRA's on CPU). Without autograd nothing has to be kept for a backward, so the layer is, for tokens x [T, n]:

    hidden = [W_r; A; -c·s·A0] x              one matmul: router logits | expert activations | residual activations
    g      = softmax(top-k logits, -inf elsewhere)       the renormalised top-k weights, zero off the top-k
    y      = W0 x + b + [s·B | B0] (g ⊙ hidden[E:])      expert j's d columns scaled by g_j, in place

s is folded into B and -c·s into A0 once per weight change (the layer caches an `InferenceWeights`), so the routing
weights are a plain softmax. After `prepare_for_inference` W0 itself holds W_res = W0 - c·s·B0 A0 and shares one
buffer with [W_r; A] (`stacked`), so a fp32 layer is one matmul in and one addmm out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True, eq=False)
class InferenceWeights:
    """A layer's adapter stacked for inference; `key` says which weight versions it was built from."""

    projection: torch.Tensor  # [E + r (+ r), n] fp32 [W_r; A (; -c·s·A0)]
    up_t: torch.Tensor  # [E + r (+ r), m] fp32 [0 | s·B | B0]ᵀ: zero rows for the logits, so one addmm takes hidden
    top_k: int
    sizes: tuple[int, ...]  # hidden's column groups: (E, r) or (E, r, r)
    key: tuple | None = None  # None: built for one traced call, or prepared (never rebuilt)
    # prepare_for_inference on a fp32 base: [W_res; W_r; A] ([m + E + r, n], W0's storage is its first m rows), its
    # bias [b; 0] (or None), (s·B)ᵀ [r, m] and the column groups (m, E, r) of its output
    stacked: torch.Tensor | None = None
    stacked_bias: torch.Tensor | None = None
    stacked_up_t: torch.Tensor | None = None
    stacked_sizes: tuple[int, int, int] | None = None


def top_k_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, E] routing weights: softmax over the top-k logits (the renormalised top-k of the softmax), 0 elsewhere."""
    top_logits, top_experts = logits.topk(top_k, sorted=False)
    return torch.full_like(logits, float("-inf")).scatter_(1, top_experts, top_logits).softmax(-1)


def gate_experts_(experts: torch.Tensor, gates: torch.Tensor) -> None:
    """Scale expert j's d columns of `experts` [T, E*d] by gates[:, j], in place."""
    if experts.shape[1] == gates.shape[1]:  # d = 1: one column per expert
        experts.mul_(gates)
    else:
        experts.unflatten(1, (gates.shape[1], -1)).mul_(gates.unsqueeze(-1))


def inference_weights(
    router_weight: torch.Tensor,
    expert_A: torch.Tensor,
    expert_B: torch.Tensor,
    residual_A: torch.Tensor | None,
    residual_B: torch.Tensor | None,
    scaling: float,
    correction: float,
    top_k: int,
    key: tuple | None = None,
) -> InferenceWeights:
    """[W_r; A; correction·A0] and [0 | s·B | B0]ᵀ, in fp32; without residual factors [W_r; A] and [0 | s·B]ᵀ."""
    E, r = router_weight.shape[0], expert_A.shape[0]
    with torch.no_grad():
        ups = [expert_B.new_zeros(expert_B.shape[0], E), expert_B * scaling]
        downs = [router_weight, expert_A]
        if residual_A is not None:
            ups.append(residual_B)
            downs.append(residual_A * correction)
        projection, up_t = torch.cat(downs).float(), torch.cat(ups, dim=1).T.float().contiguous()
    return InferenceWeights(projection, up_t, top_k, (E, r) if residual_A is None else (E, r, r), key)


def adapter_delta(tokens: torch.Tensor, w: InferenceWeights) -> torch.Tensor:
    """The adapter's [T, m] output for fp32 tokens [T, n] (the residual included when `w` carries it)."""
    hidden = F.linear(tokens, w.projection)  # [T, E + r (+ r)]
    logits, experts, *_ = hidden.split(w.sizes, 1)
    gate_experts_(experts, top_k_gates(logits, w.top_k))
    return hidden @ w.up_t  # the logits meet zero rows


def fused_base_forward(tokens: torch.Tensor, weight: torch.Tensor, bias, w: InferenceWeights) -> torch.Tensor:
    """W0 x + b plus the adapter for fp32 tokens [T, n] and a plain fp32 base: two matmuls and an addmm."""
    out = F.linear(tokens, weight, bias)  # [T, m]
    hidden = F.linear(tokens, w.projection)  # [T, E + r (+ r)]
    logits, experts, *_ = hidden.split(w.sizes, 1)
    gate_experts_(experts, top_k_gates(logits, w.top_k))
    return out.addmm_(hidden, w.up_t)


def stacked_forward(tokens: torch.Tensor, w: InferenceWeights) -> torch.Tensor:
    """A prepared fp32 layer: [W_res; W_r; A] x + [b; 0] in one matmul, then one addmm with (s·B)ᵀ."""
    base, logits, experts = F.linear(tokens, w.stacked, w.stacked_bias).split(w.stacked_sizes, 1)
    gate_experts_(experts, top_k_gates(logits, w.top_k))
    return torch.addmm(base, experts, w.stacked_up_t)


def factored_forward(
    tokens: torch.Tensor,
    out: torch.Tensor,
    router_weight,
    expert_A,
    expert_B,
    residual_A,
    residual_B,
    scaling: float,
    correction: float,
    top_k: int,
) -> torch.Tensor:
    """out [T, m] (fp32: W0 x + b) plus the adapter, from the layer's own factors: under torch.compile, where the
    cached stacked copies cannot be checked against the weights and building them anew would copy every layer's
    factors on every token. Three small matmuls in, two addmm out."""
    experts = F.linear(tokens, expert_A)  # [T, r]
    gate_experts_(experts, top_k_gates(F.linear(tokens, router_weight), top_k))
    out = torch.addmm(out, experts, expert_B.T, alpha=scaling)
    if residual_A is None:
        return out
    return torch.addmm(out, F.linear(tokens, residual_A), residual_B.T, alpha=correction)
