"""GoatLinear's forward written with autograd ops (goat_hf 0.2's, 15 matmuls per training step): the benchmarks
time it beside the fused autograd.Function (8, as LoRA: see goat_hf/fused.py) to show what the fusion buys.

It is the layer's own dropout path (`_forward_with_dropout`) run without dropout, so it computes what the fused
forward computes; bench_layer.py checks that before timing.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from goat_hf import GoatLinear, goat_layers


def _autograd_forward(self: GoatLinear, x: torch.Tensor) -> torch.Tensor:
    result = self.base_layer(x)
    if not self.adapter_enabled:
        return result
    with torch.autocast(x.device.type, enabled=False):
        tokens = x.reshape(-1, self.in_features).to(torch.float32)
        return self._forward_with_dropout(tokens, result, x.shape[:-1])


def use_autograd_path(layer: GoatLinear) -> GoatLinear:
    """This layer (in place) computes with autograd ops instead of the fused Function."""
    layer.forward = types.MethodType(_autograd_forward, layer)
    return layer


def use_autograd_path_everywhere(model: nn.Module) -> nn.Module:
    for layer in goat_layers(model).values():
        use_autograd_path(layer)
    return model
