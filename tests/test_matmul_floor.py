"""benchmarks/matmul_floor.py's per-token multiply-add counts equal what torch's FLOP counter sees the real layers do.

The README's multiply-add ratios of GOAT / LoRA (1.076 at r = 32 while W0 stays untouched) rest on these counts;
here they are checked against the fused GoatLinear and PEFT's LoRA layer, forward + backward and no-grad forward,
and every matrix product the layers run is checked to be one the counter counts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from goat_hf import GoatConfig, GoatLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from matmul_floor import goat_macs, lora_macs  # noqa: E402

T, N, M, R, E = 64, 48, 40, 16, 8


MATRIX_PRODUCTS = ("mm", "mv", "dot", "bmm", "matmul", "linear", "einsum", "tensordot", "inner", "outer")


def addmm_inplace_flop(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


COUNTED = {torch.ops.aten.addmm_: addmm_inplace_flop}  # the counter knows addmm, not the fused layer's addmm_


class OpNames(TorchDispatchMode):
    """Every aten op a forward / backward runs, by its overload packet."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def run(layer: nn.Module, step: bool) -> None:
    x = torch.randn(T, N, requires_grad=step)
    if step:
        layer(x).backward(torch.randn(T, M))
    else:
        with torch.no_grad():
            layer(x)


def counted_macs(layer: nn.Module, step: bool) -> int:
    """Multiply-adds per token of one forward (+ backward) of `layer`, as FlopCounterMode counts them; every matrix
    product that ran must be one it counts."""
    with OpNames() as ops:
        run(layer, step)
    with FlopCounterMode(display=False, custom_mapping=COUNTED) as counter:
        run(layer, step)
    registry = set(counter.flop_registry)
    products = {op for op in ops.seen if any(word in op.__name__ for word in MATRIX_PRODUCTS)}
    assert products <= registry, f"matrix products the counter misses: {sorted(map(str, products - registry))}"
    total = counter.get_total_flops()
    assert total % (2 * T) == 0
    return total // (2 * T)


def frozen_linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(N, M, bias=False).requires_grad_(False)


@pytest.mark.parametrize("step", [True, False], ids=["train-step", "no-grad"])
@pytest.mark.parametrize("init", ["goat", "zero"])
def test_goat_counts_match_the_fused_layer(init, step):
    layer = GoatLinear.from_linear(frozen_linear(), GoatConfig(r=R, num_experts=E, top_k=2, init=init))
    base = (2 if step else 1) * N * M  # the frozen W0: forward and dx
    assert counted_macs(layer, step) == base + goat_macs(N, M, R, E, residual=init != "zero", step=step)


@pytest.mark.parametrize("step", [True, False], ids=["train-step", "no-grad"])
def test_lora_counts_match_peft(step):
    config = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["0"])
    model = inject_adapter_in_model(config, nn.Sequential(frozen_linear()))
    base = (2 if step else 1) * N * M
    assert counted_macs(model, step) == base + lora_macs(N, M, R, step)
