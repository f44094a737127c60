"""The inference forward of a GOAT layer: the fewest PyTorch operations the maths allows.

Decoding runs one token per sequence through ~200 layers, so a GOAT layer's cost there is its count of operations,
not its arithmetic: each small op costs a few µs of dispatch, more when the frozen matmul before it has just streamed
megabytes of weights through the caches (a dozen small ops per layer made a SmolLM2-135M token 1.5x a merged LoRA's on
CPU). Without autograd nothing has to be kept for a backward, so the layer is, for tokens x [T, n]:

    logits = x W_rᵀ                                   [T, E]
    low    = x [A; -c·s·A0]ᵀ                          [T, r (+ r)]  expert activations | residual activations
    g      = softmax(top-k logits, -inf elsewhere)    the renormalised top-k weights, zero off the top-k
    y      = W0 x + b + (g ⊙ low) [s·B | B0]ᵀ         expert j's d columns of low scaled by g_j, in place; one addmm

s is folded into B and -c·s into A0 once per weight change (the layer caches an `InferenceWeights`), so the routing
weights are a plain softmax. The factors are kept transposed and contiguous: two small `mm`s cost less than one
matmul of x with [W_r; A] split in two (a `split` is an op of its own), and far less than stacking them under W0
(measured: a matmul of W0 with 16 extra rows ran up to 20 µs slower per layer than W0's). After
`prepare_for_inference` W0 itself holds W_res = W0 - c·s·B0 A0 and the residual's columns are gone. On the CPU with
an fp32 base, the same maths runs as one call from Python to a C++ kernel (cpu_kernel.py), where it can be built.

Under torch.compile (`traced_adapter`) the same maths is written for inductor instead: a decode step's small matmuls
as products and sums, the top-k as k rounds of argmax, so that the whole adapter becomes one generated kernel beside
W0's matmul (with `mm` and `topk`, each a library call of its own, it was seven calls beside it). A prepared fp32
layer goes one step further (`traced_extended_forward`): its weight is [W_res | s·B], so the up-projection runs inside
W0's matmul and the adapter's one kernel comes before it, with nothing after it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cpu_kernel import decode_kernel


@dataclass(slots=True, eq=False)
class InferenceWeights:
    """A layer's adapter folded for inference; `key` says which weight versions it was built from."""

    router_t: torch.Tensor  # [n, E] fp32 W_rᵀ
    down_t: torch.Tensor  # [n, r (+ r)] fp32 [A; -c·s·A0]ᵀ
    up_t: torch.Tensor  # [r (+ r), m] fp32 [s·B | B0]ᵀ
    expert_columns: int  # r: down_t's first r columns are the experts', gated; the residual's r (if any) follow
    key: tuple | None = None  # None: prepared (never rebuilt)
    # the tensors the key was read from: held so that no other tensor can take their addresses while the key lives
    sources: tuple[torch.Tensor, ...] = ()
    # prepared fp32 bases only (prepare_for_inference): [m, n + r] [W_res | s·B], the base weight a view of its first
    # n columns, so that a compiled step's up-projection runs inside W0's matmul; and [W_r; A] [E + r, n]
    extended_weight: torch.Tensor | None = None
    router_down: torch.Tensor | None = None
    # fp32 CPU bases (attach_kernel_): the CPU decode kernel (cpu_kernel.py), W0 x + b plus the adapter in one call
    # from Python, and [W_rᵀ | down_t] [n, E + cols] for its one matmul (router_t and down_t then views of it)
    kernel: Callable[..., torch.Tensor] | None = None
    router_down_t: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        """Pickled (torch.save of a model, a spawned process) without the kernel, a function of a module that only
        exists where it was loaded: the unpickled copy loads it anew."""
        state = {name: getattr(self, name) for name in self.__slots__}
        state["kernel"] = state["kernel"] is not None
        return state

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        if self.kernel:
            self.kernel = decode_kernel()


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
    """W_rᵀ, [A; correction·A0]ᵀ and [s·B | B0]ᵀ, folded in fp32 whatever the factors' dtype; without residual
    factors Aᵀ and (s·B)ᵀ."""
    with torch.no_grad():
        ups, downs = [expert_B.float() * scaling], [expert_A.float()]
        if residual_A is not None:
            ups.append(residual_B.float())
            downs.append(residual_A.float() * correction)
        router_t = router_weight.float().T.contiguous()
        down_t, up_t = torch.cat(downs).T.contiguous(), torch.cat(ups, dim=1).T.contiguous()
    sources = tuple(t.detach() for t in (router_weight, expert_A, expert_B, residual_A, residual_B) if t is not None)
    return InferenceWeights(router_t, down_t, up_t, expert_A.shape[0], key, sources)


def attach_kernel_(w: InferenceWeights, kernel: Callable[..., torch.Tensor] | None) -> InferenceWeights:
    """Give `w` the CPU kernel (None: leave it to ATen ops) and the one [n, E + cols] matrix it multiplies x with;
    router_t and down_t become views of it (no second copy of them)."""
    if kernel is not None:
        E = w.router_t.shape[1]
        w.router_down_t = torch.cat([w.router_t, w.down_t], dim=1)
        w.router_t, w.down_t = w.router_down_t[:, :E], w.router_down_t[:, E:]
        w.kernel = kernel
    return w


def gated_low_rank(tokens: torch.Tensor, w: InferenceWeights, top_k: int) -> torch.Tensor:
    """fp32 tokens [T, n] -> their [T, r (+ r)] low-rank activations, the experts' gated in place. The logits come
    from a matmul of their own and never meet the up-projection (a -inf logit times a zero would be NaN)."""
    low = torch.mm(tokens, w.down_t)
    experts = low if low.shape[1] == w.expert_columns else low[:, : w.expert_columns]
    gate_experts_(experts, top_k_gates(torch.mm(tokens, w.router_t), top_k))
    return low


def adapter_delta(tokens: torch.Tensor, w: InferenceWeights, top_k: int) -> torch.Tensor:
    """The adapter's [T, m] output for fp32 tokens [T, n] (the residual included when `w` carries it)."""
    return torch.mm(gated_low_rank(tokens, w, top_k), w.up_t)


def fused_base_forward(
    tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w: InferenceWeights, top_k: int
) -> torch.Tensor:
    """W0 x + b plus the adapter for fp32 tokens [T, n] and a plain fp32 base: three matmuls and an addmm (the CPU
    kernel, `w.kernel`, does the same in one call from Python)."""
    low = gated_low_rank(tokens, w, top_k)
    return F.linear(tokens, weight, bias).addmm_(low, w.up_t)


def matmul_as_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [T, n] times b [c, n] transposed, as a product and a sum over n: inductor fuses it with the ops around it
    into one generated kernel, where `mm` is a library call of its own (a dispatch per call is what a decoded
    token costs). The arithmetic is T·n·c, a few % of W0's; for many tokens (a compiled prefill or evaluation) a
    library matmul is faster, so callers use it only for few (see SUMMED_TOKENS)."""
    return (a.unsqueeze(1) * b).sum(-1)


SUMMED_TOKENS = 64  # up to this many tokens, the traced forward computes its small matmuls as fused sums


def fusable_top_k_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """`top_k_gates` as k rounds of argmax and masks (ties: the lower index), which inductor fuses into one kernel
    with the softmax, where `topk` would be a library call of its own."""
    experts = torch.arange(logits.shape[-1], device=logits.device)
    remaining, picked = logits, None
    for _ in range(top_k):
        hit = experts == remaining.argmax(-1, keepdim=True)  # [T, E]
        picked = hit if picked is None else picked | hit
        remaining = remaining.masked_fill(hit, float("-inf"))
    return logits.masked_fill(~picked, float("-inf")).softmax(-1)


def extend_base_weight_(weight: torch.nn.Parameter, w: InferenceWeights) -> None:
    """Give a prepared fp32 layer [W_res | s·B] (`w.extended_weight`), W_res x + s·B (g ⊙ low) being one matmul of it
    with [x; g ⊙ low]: the base weight becomes a view of its first n columns (W0's own storage is freed), and
    [W_r; A] one tensor for the compiled step's one reduction."""
    n = weight.shape[1]
    with torch.no_grad():
        w.extended_weight = torch.cat([weight, w.up_t.T], dim=1)
        w.router_down = torch.cat([w.router_t, w.down_t], dim=1).T.contiguous()
    weight.data = w.extended_weight[:, :n]


def traced_extended_forward(
    tokens: torch.Tensor, bias: torch.Tensor | None, w: InferenceWeights, top_k: int
) -> torch.Tensor:
    """A prepared fp32 layer's [T, m] output under torch.compile, [W_res | s·B] [x; g ⊙ low] + b: the router, the
    experts' activations and their gates become one generated kernel before W0's matmul, and nothing runs after it
    (measured 4-5 % faster a decoded token than adding the up-projection in a kernel after W0's matmul)."""
    E = w.router_t.shape[1]
    matmul = matmul_as_sum if tokens.shape[0] <= SUMMED_TOKENS else F.linear
    both = matmul(tokens, w.router_down)  # [T, E + r]: logits | expert activations
    low = both[:, E:]
    gate_experts_(low, fusable_top_k_gates(both[:, :E], top_k))
    return F.linear(torch.cat([tokens, low], dim=1), w.extended_weight, bias)


def traced_adapter(
    tokens: torch.Tensor,
    router_weight: torch.Tensor,
    expert_A: torch.Tensor,
    expert_B: torch.Tensor,
    residual_A: torch.Tensor | None,
    residual_B: torch.Tensor | None,
    scaling: float,
    correction: float,
    top_k: int,
) -> torch.Tensor:
    """The adapter's [T, m] output for fp32 tokens [T, n], from the layer's own factors, for torch.compile: the
    cached folded copies cannot be checked against the weights in a graph, and building them anew would copy
    every layer's factors on every token. For a decode step (few tokens) every small matmul is a fused sum, so
    inductor makes the whole adapter, and its addition to W0 x, one generated kernel."""
    matmul = matmul_as_sum if tokens.shape[0] <= SUMMED_TOKENS else F.linear
    experts = matmul(tokens, expert_A.float())  # [T, r]
    gate_experts_(experts, fusable_top_k_gates(matmul(tokens, router_weight.float()), top_k))
    out = matmul(experts, expert_B.float()) * scaling
    if residual_A is None:
        return out
    return out + matmul(matmul(tokens, residual_A.float()), residual_B.float()) * correction
