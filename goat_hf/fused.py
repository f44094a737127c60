"""The fused GOAT layer as one autograd Function: LoRA's matmul count, with the router and the frozen residual.

A GOAT layer computes, for tokens x [T, n],

    y = W0 x + b + s·B (g ⊙ A x) - c·s·B0 A0 x,    g = top-k softmax of the router logits W_r x (renormalised)

Written with autograd ops this costs 15 matmuls per training step against LoRA's 8 (three for the router, four
for the frozen residual). Here the rows of W_r, A and -c·s·A0 are stacked so that one matmul gives the router
logits, the experts' activations and the residual activations, [T, E + 2r]; the experts' columns are gated in
place and the gated and residual activations meet [B | B0] in one matmul that adds into W0 x + b. The backward
computes only what needs a gradient: one matmul back through [B | B0], one for dB, one for [dW_r; dA] and one for
dx, into which the frozen W0's dx is added (no separate pass over [T, n]). Small-dimension softmaxes are written
out (PyTorch's softmax over E = 8 columns costs four times more on CPU). Nothing syncs with the host: no
`.item()`, no data-dependent shapes, so a CUDA step queues without waiting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def small_softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax over a short last dimension (E or k values), with autograd ops that vectorise over the tokens."""
    weights = (logits - logits.amax(-1, keepdim=True)).exp()
    return weights / weights.sum(-1, keepdim=True)


def routing_gates(logits: torch.Tensor, top_k: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [T, E] gates s·w (zero off the top-k) and the [T, k] picked experts; differentiable in the logits.

    The renormalised top-k of softmax(z) is the softmax of the top-k logits: one softmax over k values.
    """
    top_logits, top_experts = logits.topk(top_k, dim=-1)  # sorted: the largest first
    weights = (top_logits - top_logits[:, :1]).exp()
    weights = weights * (scaling / weights.sum(-1, keepdim=True))
    return torch.zeros_like(logits).scatter_(1, top_experts, weights), top_experts


class FusedGoatFunction(torch.autograd.Function):
    """(x, W0, b, base, W_r, A, B, A0, B0) -> (output, router probabilities or None, picked experts).

    x: [T, n] fp32 tokens. Either W0 [m, n] (and b) of a plain fp32 frozen Linear, computed here so that its dx
    shares the adapter's pass; or `base`, the base layer's own [T, m] fp32 output, added into; or neither (the
    caller adds the base output, e.g. a bf16 one). W_r [E, n], A [r, n], B [m, r] are trained; A0, B0 are the
    frozen residual factors (None for init="zero"). With `with_probs` the router probabilities are returned
    for the balance loss, and their gradient joins the routing one in the backward.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        base_weight,
        base_bias,
        base,
        router_weight,
        expert_A,
        expert_B,
        residual_A,
        residual_B,
        scaling,
        correction,
        top_k,
        with_probs,
    ):
        E, r = router_weight.shape[0], expert_A.shape[0]
        projection, up = stacked_weights(router_weight, expert_A, expert_B, residual_A, residual_B, correction)
        out, probs, top_experts, hidden, gates = fused_forward(
            x, base_weight, base_bias, base, projection, up, E, r, scaling, top_k, with_probs
        )
        # the weights themselves, not their stacked copies: those are rebuilt in the backward (small, transient)
        ctx.save_for_backward(
            x, base_weight, hidden, gates, probs, router_weight, expert_A, expert_B, residual_A, residual_B
        )
        ctx.correction = correction
        ctx.scaling, ctx.rank, ctx.has_base = scaling, r, base is not None
        ctx.mark_non_differentiable(top_experts)
        ctx.set_materialize_grads(False)  # a balance loss alone reaches the router only (no zero dA, dB)
        return out, probs, top_experts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_probs, _):
        x, base_weight, hidden, gates, probs, *weights = ctx.saved_tensors
        projection, up = stacked_weights(*weights, ctx.correction)
        E, r = gates.shape[1], ctx.rank
        needs = ctx.needs_input_grad
        grad_hidden = torch.zeros_like(hidden) if grad_out is None else torch.empty_like(hidden)
        grad_up = None
        if grad_out is not None:
            grad_hidden[:, E:] = grad_out @ up  # [T, r (+ r)]: gated | residual activations
            gated, grad_gated = hidden[:, E : E + r], grad_hidden[:, E : E + r]
            weighted = (grad_gated * gated).unflatten(1, (E, -1)).sum(-1)  # [T, E]: G ⊙ dG, from s·w·h = gated
            # G = s·softmax(top-k logits), zero elsewhere: dz = G⊙dG - (G/s)·Σ G⊙dG, zero off the top-k by itself
            grad_hidden[:, :E] = weighted - gates * (weighted.sum(-1, keepdim=True) / ctx.scaling)
            grad_gated.unflatten(1, (E, -1)).mul_(gates.unsqueeze(-1))  # d(A x) = dG_cols ⊙ G
            grad_up = grad_out.T @ gated if needs[6] else None  # dB
        if grad_probs is not None:
            grad_hidden[:, :E] += probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
        grad_x = None
        if needs[0]:
            grad_x = grad_hidden @ projection
            if base_weight is not None and grad_out is not None:
                grad_x.addmm_(grad_out, base_weight)  # the frozen W0's dx, in the same pass
        grad_router = grad_A = None
        if needs[4] or needs[5]:
            grad_rows = grad_hidden[:, : E + r].T @ x  # [E + r, n]: dW_r and dA in one matmul
            grad_router, grad_A = grad_rows[:E], grad_rows[E:] if grad_out is not None else None
        grad_base = grad_out if ctx.has_base and needs[3] else None
        return grad_x, None, None, grad_base, grad_router, grad_A, grad_up, None, None, None, None, None, None


def fused_forward(x, base_weight, base_bias, base, projection, up, E, r, scaling, top_k, with_probs):
    """The forward of FusedGoatFunction on stacked weights: (out, probs, picked experts, hidden, gates)."""
    hidden = x @ projection.T  # [T, E + r (+ r)]: router logits | expert activations | residual activations
    logits = hidden[:, :E]
    gates, top_experts = routing_gates(logits, top_k, scaling)
    hidden[:, E : E + r].unflatten(1, (E, -1)).mul_(gates.unsqueeze(-1))  # expert j's d columns × s·w_j
    if base_weight is not None:
        out = F.linear(x, base_weight, base_bias).addmm_(hidden[:, E:], up.T)
    elif base is not None:
        out = torch.addmm(base, hidden[:, E:], up.T)
    else:
        out = hidden[:, E:] @ up.T
    probs = small_softmax(logits) if with_probs else None
    return out, probs, top_experts, hidden, gates


def stacked_weights(router_weight, expert_A, expert_B, residual_A, residual_B, correction):
    """[W_r; A; c·A0] ([E + r (+ r), n]) and [B | B0] ([m, r (+ r)]); c = -c·s is folded into the frozen rows."""
    if residual_A is None:
        return torch.cat([router_weight, expert_A]), expert_B
    projection = torch.cat([router_weight, expert_A, residual_A * correction])
    return projection, torch.cat([expert_B, residual_B], dim=1)
