"""Proposed GoatLinear forwards, measured by bench_layer.py --patched (the package itself is not changed).

Each computes what GoatLinear computes (bench_layer checks outputs and balance loss before timing). The two
classes only replace `forward` (and, for one-pass, `_route`), written for dropout = 0 and a layer with a residual.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from goat_hf import GoatLinear
from goat_hf.layer import RoutingRecord


class LeanGoatLinear(GoatLinear):
    """Proposed GoatLinear.forward, same maths: s is folded into the k gate weights and c*s into the rank-r
    residual activations, and the residual is added in place with addmm_. That leaves 2 elementwise passes over
    [T, m] per forward+backward (addmm_ and the final add) where GoatLinear makes 7 (4 forward: *c, -, *s, +;
    3 backward: *s, neg, *c).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # [..., m]
        if not self.adapter_enabled:
            return result
        E, d, tokens_shape = self.num_experts, self.expert_rank, x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(torch.float32)  # [T, n]
        gates = self._route(x, tokens_shape) * self.scaling  # [T, E], the k weights times s
        h = self.dropout(x) @ self.expert_A.T  # [T, E*d]
        delta = (h.view(-1, E, d) * gates.unsqueeze(-1)).view(-1, E * d) @ self.expert_B.T  # [T, m]
        if self.residual_A is not None:
            residual = (x @ self.residual_A.T) * (-self.init_cof * self.scaling)  # [T, r]
            delta = delta.addmm_(residual, self.residual_B.T)  # mm outputs are not saved: in place is safe
        return result + delta.view(result.shape).to(result.dtype)


class OnePassGoatLinear(GoatLinear):
    """Proposed structural fix: the adapter's matmuls are skinny (rank 32, 8) and memory-bound, so their cost
    follows the passes over [T, n] and [T, m], not the FLOPs. GoatLinear makes 13 per forward+backward (x @ A,
    x @ R_A, router, h @ B, r @ R_B, and their backward) where LoRA makes 6. Here the experts' A, the residual's
    A and the router are one [2r+E, n] matmul, and B with the residual's B one [m, 2r] matmul: 6 passes. Same
    maths; with dropout > 0 the experts' A would need its own matmul on dropout(x) (7 passes).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # [..., m]
        if not self.adapter_enabled:
            return result
        E, d, r = self.num_experts, self.expert_rank, self.num_experts * self.expert_rank
        x = x.reshape(-1, self.in_features).to(torch.float32)  # [T, n]
        down = torch.cat([self.expert_A, self.residual_A, self.router.weight])  # [2r + E, n]
        h, residual, logits = (x @ down.T).split([r, r, E], dim=1)  # [T, r], [T, r], [T, E]
        gates = self._route(logits) * self.scaling  # [T, E], the k weights times s
        h = (h.view(-1, E, d) * gates.unsqueeze(-1)).view(-1, r)
        up = torch.cat([h, residual * (-self.init_cof * self.scaling)], dim=1)  # [T, 2r]
        delta = up @ torch.cat([self.expert_B, self.residual_B], dim=1).T  # [T, m]
        return result + delta.view(result.shape).to(result.dtype)

    def _route(self, logits: torch.Tensor) -> torch.Tensor:
        """GoatLinear._route from the router logits instead of x (the same statements after the first)."""
        probs = F.softmax(logits, dim=-1)  # [T, E]
        top_w, top_i = probs.topk(self.top_k, dim=-1)  # [T, k]
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        picks = torch.zeros_like(probs).scatter_(1, top_i, 1.0)
        real = self._real_tokens(logits.shape[:-1], probs)
        real = torch.ones_like(probs[:, :1]) if real is None else real
        num_real = real.sum().clamp(min=1.0)
        f, P = (picks * real).sum(0) / num_real, (probs * real).sum(0) / num_real
        balance = self.num_experts * (f * P).sum()
        self.routing = RoutingRecord(probs.detach(), top_i, f.detach() / self.top_k, balance)
        return torch.zeros_like(probs).scatter_(1, top_i, top_w)


def merge_residual(layer: GoatLinear) -> None:
    """The reference's layout: W_res in the frozen weight and no residual path (lean forward otherwise). Cheapest,
    but switching the adapter off or unloading no longer gives W0 bit-exactly, which DESIGN §2 promises."""
    with torch.no_grad():
        layer.base_layer.weight -= layer.init_cof * layer.scaling * layer.residual_B @ layer.residual_A
    layer.residual_A = layer.residual_B = None
    layer.__class__ = LeanGoatLinear


def use_forward(cls: type[GoatLinear]) -> Callable[[GoatLinear], None]:
    def patch(layer: GoatLinear) -> None:
        layer.__class__ = cls

    return patch


# In-place patches of one GoatLinear (same weights, same function), by the names the benchmarks print.
PATCHES: dict[str, Callable[[GoatLinear], None]] = {
    "lean": use_forward(LeanGoatLinear),
    "onepass": use_forward(OnePassGoatLinear),
    "merged": merge_residual,
}


def patched_copies(goat: GoatLinear) -> dict[str, nn.Module]:
    """One patched deep copy of `goat` per entry of PATCHES."""
    copies = {name: copy.deepcopy(goat) for name in PATCHES}
    for name, layer in copies.items():
        PATCHES[name](layer)
    return copies
