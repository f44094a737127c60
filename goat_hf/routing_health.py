"""Routing health: how evenly each layer spreads its tokens over the experts (for logs and model cards)."""

from __future__ import annotations

import math

import torch


def load_summary(loads: torch.Tensor) -> dict[str, float]:
    """Summary of per-layer expert loads [L, E] (each row sums to 1): the worst layers and the mean entropy.

    `load_min`/`load_max` are the smallest and largest share any expert gets in any layer (1/E each when
    balanced); `load_entropy` is the mean over layers of the load entropy divided by log(E) (1 = balanced).
    """
    num_experts = loads.shape[-1]
    entropy = -(loads * loads.clamp(min=1e-12).log()).sum(-1) / max(math.log(num_experts), 1e-12)
    return {
        "load_min": loads.min().item(),
        "load_max": loads.max().item(),
        "load_entropy": entropy.mean().item() if num_experts > 1 else 1.0,
    }
