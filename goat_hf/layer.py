"""GoatLinear: a frozen nn.Linear plus E top-k routed LoRA experts, computed as one rank-r LoRA."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base_weights import dense_weight
from .config import GoatConfig
from .cpu_kernel import kernel_for
from .decode import (
    InferenceWeights,
    adapter_delta,
    attach_kernel_,
    fused_base_forward,
    inference_weights,
    traced_adapter,
    traced_extended_forward,
)
from .fused import FusedGoatFunction, fused_forward, routing_gates, small_softmax, stacked_weights
from .init import scaled_expert_factors
from .routing_record import RoutingRecord, RoutingRequests, real_tokens, routing_record


class GoatLinear(nn.Module):
    """GOAT layer (Fan et al., ICML 2025, arXiv 2502.16894, §3):

        y = W_res x + sum_j w_j(x) * s * B_j A_j dropout(x),   W_res = W0 - c * s * sum_j B0_j A0_j

    w(x) = top-k of softmax(W_router x), renormalised to sum to 1. W0 stays untouched in `base_layer` and the
    correction c*s*B0*A0 (the experts' initial factors, frozen) is applied as a low-rank term, so switching
    the adapter off or unloading gives back W0 exactly and a saved adapter reloads without an SVD.

    The experts are stacked (A: [E*d, n], B: [m, E*d]) so that the forward is one rank-r LoRA with the d
    columns of each expert scaled by its routing weight: no loop over experts, no per-expert gather/scatter.
    Dropout draws one mask shared by all experts (the reference code draws one per expert).
    Adapters and router are fp32 whatever the base dtype.
    """

    def __init__(self, base_layer: nn.Linear, config: GoatConfig, scaling: float, with_residual: bool) -> None:
        super().__init__()
        n, m, device = base_layer.in_features, base_layer.out_features, base_layer.weight.device
        self.base_layer = base_layer
        self.num_experts, self.top_k, self.expert_rank = config.num_experts, config.top_k, config.expert_rank
        self.scaling = scaling
        self.init_cof = config.init_cof
        self.expert_A = nn.Parameter(torch.zeros(config.r, n, device=device))  # [E*d, n]
        self.expert_B = nn.Parameter(torch.zeros(m, config.r, device=device))  # [m, E*d]
        self.router = nn.Linear(n, config.num_experts, bias=False, device=device, dtype=torch.float32)
        # Frozen initial factors: W_res = W0 - c*s*residual_B @ residual_A. None for init="zero" (no residual).
        self.register_buffer("residual_A", torch.zeros(config.r, n, device=device) if with_residual else None)
        self.register_buffer("residual_B", torch.zeros(m, config.r, device=device) if with_residual else None)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.has_dropout = config.lora_dropout > 0  # a plain attribute: read on every forward
        self.adapter_enabled = True
        self.token_mask: torch.Tensor | None = None  # over x.shape[:-1] (matched by shape); 0 marks padding
        self.routing: RoutingRecord | None = None  # training with grad only, unless record_routing
        self._record_routing = False  # read through the property below, set through its setter
        self.routing_requests = RoutingRequests()  # shared by a model's layers and its mask hook (TokenMaskHook)
        self._inference_cache: InferenceWeights | None = None  # kept between no-grad forwards
        self.prepared: InferenceWeights | None = None  # set by goat_hf.prepare_for_inference

    @classmethod
    def from_linear(
        cls, base_layer: nn.Linear, config: GoatConfig, generator: torch.Generator | None = None
    ) -> GoatLinear:
        """Wrap a pretrained Linear (or a bitsandbytes 4-/8-bit one), initialising the experts from the SVD segments
        of its dense fp32 weight (DESIGN §2), read for this layer alone so that memory stays bounded."""
        A, B, scaling = scaled_expert_factors(dense_weight(base_layer), config, generator)
        layer = cls(base_layer, config, scaling, with_residual=config.init != "zero")
        router = torch.empty(config.num_experts, base_layer.in_features)  # drawn on the CPU: same on any device
        nn.init.kaiming_uniform_(router, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            layer.router.weight.copy_(router)
            layer.expert_A.copy_(A)
            layer.expert_B.copy_(B)
            if layer.residual_A is not None:
                layer.residual_A.copy_(A)
                layer.residual_B.copy_(B)
        return layer

    @property
    def record_routing(self) -> bool:
        """True: record routing in evaluation and under no_grad too (goat_hf.record_routing)."""
        return self._record_routing

    @record_routing.setter
    def record_routing(self, record: bool) -> None:
        record = bool(record)
        self.routing_requests.add(record - self._record_routing)
        self._record_routing = record

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """W0, so code that inspects `layer.weight` (dtype, device, tied weights) keeps working."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() or self._record_routing or torch.compiler.is_compiling()):
            out = self._kernel_forward(x)
            if out is not None:
                return out
        if not self.adapter_enabled:
            return self.base_layer(x)  # [..., m]  W0 x, exactly
        with_dropout = self.training and self.has_dropout
        if self.prepared is not None or not (torch.is_grad_enabled() or self._record_routing or with_dropout):
            if self.routing is not None:  # nn.Module.__setattr__ costs a few µs a token otherwise
                self.routing = None
            return self._inference_forward(x)
        self._require_fp32_adapter()
        result = (
            None if not with_dropout and self._base_fuses(self.base_layer, x) else self.base_layer(x)
        )  # None: W0 x fused
        with torch.autocast(x.device.type, enabled=False):  # experts and router run in fp32 under bf16 autocast too
            tokens_shape = x.shape[:-1]  # the mask must match it, not just its element count
            x = x.reshape(-1, self.in_features).to(torch.float32)  # [T, n]
            if with_dropout:
                return self._forward_with_dropout(x, result, tokens_shape)
            out, probs, top_experts = self._fused(x, result)
            self.routing = self._record(probs, top_experts, tokens_shape) if probs is not None else None
        if result is None or result.dtype == torch.float32:
            return out.view(*tokens_shape, self.out_features)
        return result + out.view(result.shape).to(result.dtype)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Decoding on the CPU: the kernel's call (cpu_kernel.py) after the fewest lookups that decide it, or None for
        the general path (anything unusual: hooks on the base, autocast, dropout in training, half dtypes, no kernel).
        The general path decides the same with more lookups, measured 5-25 µs more a layer: each one misses the caches
        that W0's matmul has just streamed megabytes through, and a token runs ~200 layers."""
        base = self._modules["base_layer"]
        if not (
            x.is_cpu  # first: elsewhere (a GPU) nothing below could end in the kernel
            and x.dtype is torch.float32
            and self.adapter_enabled
            and not (self.training and self.has_dropout)
            and type(base) is nn.Linear
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing()  # a trace cannot record the kernel's call: it would replay a wrong graph
        ):
            return None
        prepared = self.prepared
        if prepared is not None:
            self._check_prepared_call(prepared, x)
        w = prepared if prepared is not None else self._inference_weights()
        params = base._parameters
        weight = params["weight"]
        if w.kernel is None or weight.dtype is not torch.float32:
            return None
        if self.routing is not None:  # what the last training forward routed (nn.Module.__setattr__ costs µs)
            self.routing = None
        return w.kernel(x, weight, params["bias"], w.router_down_t, w.up_t, self.top_k, w.expert_columns)

    def train(self, mode: bool = True) -> GoatLinear:
        self.forget_inference_weights()  # a safe point to rebuild them (see _inference_weights)
        return super().train(mode)

    def forget_inference_weights(self) -> None:
        """Drop the folded weights the no-grad forward keeps, for writes its cache key cannot see (_inference_weights);
        the next no-grad forward folds them anew."""
        self._inference_cache = None

    def _apply(self, fn, recurse: bool = True) -> GoatLinear:
        """`.to()`, `.half()` and the like: a prepared layer whose base weight they replaced (a new dtype or device)
        drops its [W_res | s·B], which would be stale and would keep an fp32 copy of the base alive; the compiled step
        then adds the up-projection after the base's own matmul."""
        module = super()._apply(fn, recurse)
        prepared = self.prepared
        extended = prepared.extended_weight if prepared is not None else None
        if extended is not None and self.base_layer.weight.data_ptr() != extended.data_ptr():  # a cast or move copies
            prepared.extended_weight = prepared.router_down = None
        return module

    def _require_fp32_adapter(self) -> None:
        """Training (and recording routing) runs the experts and router in fp32 (DESIGN §2); `model.to(dtype)` casts
        them too, and the fused Function would then fail on a matmul of mixed dtypes."""
        adapter = (self.expert_A, self.expert_B, self.router.weight)
        dtype = next((p.dtype for p in adapter if p.dtype != torch.float32), None)
        if dtype is not None:
            raise RuntimeError(
                f"GOAT's experts and router are {dtype} here (model.to(dtype) casts them with the base); GOAT trains "
                "them in fp32. Call goat_hf.keep_goat_in_fp32(model) after casting the model. (Inference accepts "
                "them as they are.)"
            )

    def _fused(self, x: torch.Tensor, result: torch.Tensor | None) -> tuple:
        """The fused Function; W0 x + b is computed inside it when `result` is None (see `forward`)."""
        if result is None:  # a plain fp32 frozen Linear: its dx joins the adapter's pass
            weight, bias, base = self.base_layer.weight, self.base_layer.bias, None
        else:
            weight = bias = None
            base = result.reshape(-1, self.out_features) if result.dtype == torch.float32 else None
        weights = (self.router.weight, self.expert_A, self.expert_B, self.residual_A, self.residual_B)
        correction = self.correction
        if torch.is_grad_enabled():
            self._inference_cache = None  # training: the weights change every step
            return FusedGoatFunction.apply(
                x, weight, bias, base, *weights, self.scaling, correction, self.top_k, self._records_routing()
            )
        projection, up = stacked_weights(*weights, correction)  # record_routing without grad: analysis, not decoding
        out, probs, top_experts, _, _ = fused_forward(
            x,
            weight,
            bias,
            base,
            projection,
            up,
            self.num_experts,
            self.expert_A.shape[0],
            self.scaling,
            self.top_k,
            self._records_routing(),
        )
        return out, probs, top_experts

    def _inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """No autograd, no routing record, no dropout: the fewest operations (goat_hf/decode.py), in fp32 whatever
        the base dtype. A prepared layer (prepare_for_inference) always comes here and refuses training.

        This runs ~200 times per generated token: submodules and parameters are read from the module's dicts
        (nn.Module.__getattr__ costs ~1 µs a lookup, as much as a small op)."""
        prepared = self.prepared
        if prepared is not None:
            self._check_prepared_call(prepared, x)
        base = self._modules["base_layer"]
        if torch.compiler.is_compiling():
            if prepared is not None and prepared.extended_weight is not None and self._base_fuses(base, x):
                out = traced_extended_forward(x.reshape(-1, x.shape[-1]), base.bias, prepared, self.top_k)
                return out.view(*x.shape[:-1], out.shape[1])
            return self._traced_forward(x, with_residual=prepared is None)
        weights = prepared if prepared is not None else self._inference_weights()
        if self._base_fuses(base, x):
            params = base._parameters  # (the CPU kernel's case returned in forward)
            tokens = x.reshape(-1, x.shape[-1])  # [T, n]
            out = fused_base_forward(tokens, params["weight"], params["bias"], weights, self.top_k)
            return out.view(*x.shape[:-1], out.shape[1])
        result = base(x)
        with torch.autocast(x.device.type, enabled=False):
            delta = adapter_delta(x.reshape(-1, x.shape[-1]).to(torch.float32), weights, self.top_k)
        return result + delta.view(result.shape).to(result.dtype)

    def _traced_forward(self, x: torch.Tensor, with_residual: bool) -> torch.Tensor:
        """The inference forward under torch.compile (decode.traced_adapter): from the factors themselves, the
        residual left out where prepare_for_inference folded it into W0; rounded as the eager forward rounds (a half
        base's output plus the adapter's, rounded once to its dtype)."""
        residual = (self.residual_A, self.residual_B) if with_residual else (None, None)
        result = self.base_layer(x)
        with torch.autocast(x.device.type, enabled=False):
            tokens = x.reshape(-1, self.in_features).float()
            delta = traced_adapter(
                tokens,
                self.router.weight,
                self.expert_A,
                self.expert_B,
                *residual,
                self.scaling,
                self.correction,
                self.top_k,
            ).view(result.shape)
        return result + delta.to(result.dtype)

    def _check_prepared_call(self, prepared: InferenceWeights, x: torch.Tensor) -> None:
        if self.training and torch.is_grad_enabled() or self._record_routing:
            raise RuntimeError(
                "This model was prepared for serving: prepare_for_inference folded the frozen residual into W0, so it "
                "can neither train nor record routing. Load the adapter onto a fresh base (load_goat_model) for that."
            )
        if prepared.up_t.device != x.device:
            raise RuntimeError(
                f"This layer was prepared for serving on {prepared.up_t.device} and got input on {x.device}; call "
                "prepare_for_inference after moving the model, on a model loaded anew."
            )

    def _inference_weights(self) -> InferenceWeights:
        """The folded weights, kept between no-grad forwards (evaluation, generate) while no weight changed: the
        key holds each tensor's address and version counter, which any in-place update (an optimizer step,
        load_state_dict) or replacement (`param.data = ...`, `.to()`) changes; the cache holds the tensors it was
        built from, so no new tensor can take their addresses. Writes through another tensor that shares a
        parameter's storage (after `param.data = t`, writing to t) are not seen: `train()`/`eval()` drop the cache, as
        does `forget_inference_weights()`. Weights made under torch.inference_mode have no version counter: their key
        is their addresses alone, so a change made in place under inference_mode shows after one of those calls
        (goat_hf's own loaders make it)."""
        params, buffers = self._parameters, self._buffers
        router, A, B = self._modules["router"]._parameters["weight"], params["expert_A"], params["expert_B"]
        A0, B0 = buffers["residual_A"], buffers["residual_B"]
        try:
            key = (router.data_ptr(), router._version, A.data_ptr(), A._version, B.data_ptr(), B._version, self.scaling)
            if A0 is not None:
                key += (A0.data_ptr(), A0._version, B0.data_ptr(), B0._version, self.init_cof)
        except RuntimeError:  # costs nothing until raised, unlike an is_inference() test of each tensor every call
            tensors = [t for t in (router, A, B, A0, B0) if t is not None]
            if not any(t.is_inference() for t in tensors):
                raise
            key = (*(t.data_ptr() for t in tensors), self.scaling, self.init_cof)
        cache = self._inference_cache
        if cache is None or cache.key != key:
            cache = inference_weights(router, A, B, A0, B0, self.scaling, self.correction, key)
            base = self._modules["base_layer"]
            if type(base) is nn.Linear:  # the CPU kernel serves plain fp32 CPU bases (cpu_kernel.py)
                attach_kernel_(cache, kernel_for(base.weight))
            self._inference_cache = cache
        return cache

    @property
    def correction(self) -> float:
        """-c·s: the frozen residual's factor, W_res = W0 + correction·B0 A0."""
        return -self.init_cof * self.scaling

    @staticmethod
    def _base_fuses(base: nn.Module, x: torch.Tensor) -> bool:
        """Whether W0 x + b can run inside the fused Function: a plain fp32 nn.Linear, frozen, without hooks (an
        accelerate offload hook must see its call), outside autocast (which would run it in bf16)."""
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return False
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        return (
            weight.dtype == x.dtype == torch.float32
            and not weight.requires_grad
            and (bias is None or not bias.requires_grad)
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _forward_with_dropout(self, x: torch.Tensor, result: torch.Tensor, tokens_shape: torch.Size) -> torch.Tensor:
        """Training with dropout > 0: the experts see dropout(x), the router and the residual x (autograd ops)."""
        E, d = self.num_experts, self.expert_rank
        logits = self.router(x)  # [T, E]
        gates, top_experts = routing_gates(logits, self.top_k, self.scaling)
        probs = small_softmax(logits) if self._records_routing() else None
        h = self.dropout(x) @ self.expert_A.T  # [T, E*d]
        delta = (h.view(-1, E, d) * gates.unsqueeze(-1)).view(-1, E * d) @ self.expert_B.T  # [T, m]
        if self.residual_A is not None:  # W_res - W0 = -c*s*B0*A0, scaled on the rank-r side (cheaper)
            correction = (x @ self.residual_A.T) * (-self.init_cof * self.scaling)  # [T, r]
            delta = delta.addmm_(correction, self.residual_B.T)  # in place: mm outputs are not saved
        self.routing = self._record(probs, top_experts, tokens_shape) if probs is not None else None
        return result + delta.view(result.shape).to(result.dtype)

    def _records_routing(self) -> bool:
        """The routing record and balance loss exist in training with grad, or on request (`record_routing`)."""
        return self._record_routing or (self.training and torch.is_grad_enabled())

    def _record(self, probs: torch.Tensor, top_experts: torch.Tensor, tokens_shape: torch.Size) -> RoutingRecord:
        return routing_record(probs, top_experts, real_tokens(self.token_mask, tokens_shape, probs))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, expert_rank={self.expert_rank}, "
            f"scaling={self.scaling:.4g}, residual={self.residual_A is not None}"
        )
