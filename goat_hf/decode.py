"""The inference forward of a GOAT layer: the fewest PyTorch operations the maths allows.

Decoding runs one token per sequence through ~200 layers, so a GOAT layer's cost there is its count of operations
and of Python attribute lookups, not its arithmetic (a dozen small ops per layer made a SmolLM2-135M token 1.5x a
merged LoRA's on CPU). Without autograd nothing has to be kept for a backward, so the layer is, for tokens x [T, n]:

    hidden = [W_r; A; -c·s·A0] x              one matmul: router logits | expert activations | residual activations
    g      = softmax(top-k logits, -inf elsewhere)       the renormalised top-k weights, zero off the top-k
    y      = W0 x + b + [s·B | B0] (g ⊙ hidden[E:])      expert j's d columns scaled by g_j, in place; one addmm

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
    up_t: torch.Tensor  # [r (+ r), m] fp32 [s·B | B0]ᵀ
    num_experts: int  # E: hidden's first E columns are the router logits
    expert_columns: int  # r: the next r are the experts' activations, gated; the residual's r (if any) follow
    key: tuple | None = None  # None: prepared (never rebuilt)
    # the tensors the key was read from: held so that no other tensor can take their addresses while the key lives
    sources: tuple[torch.Tensor, ...] = ()
    # prepare_for_inference on a fp32 base: [W_res; W_r; A] ([m + E + r, n], W0's storage is its first m rows), its
    # bias [b; 0] (or None) and the column groups (m, E, r) of its output; up_t is then (s·B)ᵀ
    stacked: torch.Tensor | None = None
    stacked_bias: torch.Tensor | None = None
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
    key: tuple | None = None,
) -> InferenceWeights:
    """[W_r; A; correction·A0] and [s·B | B0]ᵀ, folded in fp32 whatever the factors' dtype; without residual
    factors [W_r; A] and (s·B)ᵀ."""
    with torch.no_grad():
        ups = [expert_B.float() * scaling]
        downs = [router_weight.float(), expert_A.float()]
        if residual_A is not None:
            ups.append(residual_B.float())
            downs.append(residual_A.float() * correction)
        projection, up_t = torch.cat(downs), torch.cat(ups, dim=1).T.contiguous()
    sources = tuple(t.detach() for t in (router_weight, expert_A, expert_B, residual_A, residual_B) if t is not None)
    return InferenceWeights(projection, up_t, router_weight.shape[0], expert_A.shape[0], key, sources)


def gated_low_rank(hidden: torch.Tensor, w: InferenceWeights, top_k: int) -> torch.Tensor:
    """hidden [T, E + r (+ r)] -> its [T, r (+ r)] low-rank columns, the experts' gated in place. The logits stay
    out of the up-projection (a -inf logit times a zero would be NaN)."""
    logits, low_rank = hidden.split((w.num_experts, hidden.shape[1] - w.num_experts), 1)
    experts = low_rank if low_rank.shape[1] == w.expert_columns else low_rank[:, : w.expert_columns]
    gate_experts_(experts, top_k_gates(logits, top_k))
    return low_rank


def adapter_delta(tokens: torch.Tensor, w: InferenceWeights, top_k: int) -> torch.Tensor:
    """The adapter's [T, m] output for fp32 tokens [T, n] (the residual included when `w` carries it)."""
    return gated_low_rank(F.linear(tokens, w.projection), w, top_k) @ w.up_t


def fused_base_forward(
    tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w: InferenceWeights, top_k: int
) -> torch.Tensor:
    """W0 x + b plus the adapter for fp32 tokens [T, n] and a plain fp32 base: two matmuls and an addmm."""
    out = F.linear(tokens, weight, bias)  # [T, m]
    return out.addmm_(gated_low_rank(F.linear(tokens, w.projection), w, top_k), w.up_t)


def stacked_forward(tokens: torch.Tensor, w: InferenceWeights, top_k: int) -> torch.Tensor:
    """A prepared fp32 layer: [W_res; W_r; A] x + [b; 0] in one matmul, then one addmm with (s·B)ᵀ."""
    base, logits, experts = F.linear(tokens, w.stacked, w.stacked_bias).split(w.stacked_sizes, 1)
    gate_experts_(experts, top_k_gates(logits, top_k))
    return torch.addmm(base, experts, w.up_t)


def factored_forward(
    tokens: torch.Tensor,
    out: torch.Tensor | None,
    router_weight: torch.Tensor,
    expert_A: torch.Tensor,
    expert_B: torch.Tensor,
    residual_A: torch.Tensor | None,
    residual_B: torch.Tensor | None,
    scaling: float,
    correction: float,
    top_k: int,
) -> torch.Tensor:
    """out [T, m] (fp32: W0 x + b) plus the adapter, or the adapter alone when `out` is None, from the layer's own
    factors: under torch.compile, where the cached stacked copies cannot be checked against the weights and building
    them anew would copy every layer's factors on every token. Three small matmuls in, two out."""
    experts = F.linear(tokens, expert_A.float())  # [T, r]
    gate_experts_(experts, top_k_gates(F.linear(tokens, router_weight.float()), top_k))
    if out is None:
        out = torch.mm(experts, expert_B.float().T).mul_(scaling)
    else:
        out = torch.addmm(out, experts, expert_B.float().T, alpha=scaling)
    if residual_A is None:
        return out
    return torch.addmm(out, F.linear(tokens, residual_A.float()), residual_B.float().T, alpha=correction)
