"""On a CUDA device (skipped without one): the fused layer over a bf16 base against the fp64 loop, no host sync
in its forward and backward, and a CPU model's SVD init on the GPU with the factors back on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_, reference_goat_forward, svd_residual
from torch import nn

from goat_hf import GoatConfig, GoatLinear
from goat_hf.init import expert_factors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIG = GoatConfig(r=16, num_experts=8, top_k=2)


def cuda_layer(dtype: torch.dtype) -> GoatLinear:
    base = nn.Linear(96, 80, bias=True).to(dtype).requires_grad_(False)
    layer = GoatLinear.from_linear(base, CONFIG, torch.Generator().manual_seed(0)).cuda()
    perturb_(layer.expert_A, layer.expert_B, layer.router.weight)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_forward_and_backward_queue_without_a_host_sync(dtype):
    layer = cuda_layer(dtype)
    x = torch.randn(4, 32, 96, device="cuda", dtype=dtype, requires_grad=True)
    layer(x)  # warm-up: kernels load, the allocator grows
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising op raises
    try:
        y = layer(x)
        (y.float().square().sum() + layer.routing.balance_loss).backward()
        with torch.no_grad():
            layer.eval()(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.expert_A.grad.dtype == torch.float32 and torch.isfinite(layer.expert_A.grad).all()


def test_bf16_base_on_cuda_matches_the_fp64_loop():
    layer = cuda_layer(torch.bfloat16)
    x = torch.randn(2, 16, 96, device="cuda", dtype=torch.bfloat16)
    y = layer(x).float().cpu()
    cpu_layer = layer.cpu()
    reference, _ = reference_goat_forward(cpu_layer, x.cpu(), svd_residual(cpu_layer.base_layer.weight, CONFIG))
    scale = reference.float().abs().max().item()
    torch.testing.assert_close(y, reference.float(), rtol=2**-6, atol=2**-6 * scale)


def test_a_cpu_weight_gets_its_svd_on_the_gpu_and_its_factors_back_on_the_cpu(monkeypatch):
    weight = torch.randn(80, 96, generator=torch.Generator().manual_seed(0))
    svd_devices = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda m, **kw: svd_devices.append(m.device.type) or svd(m, **kw))
    A, B = expert_factors(weight, CONFIG, scaling=2.0)
    assert svd_devices == ["cuda"] and A.device.type == B.device.type == "cpu"
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    cpu_A, cpu_B = expert_factors(weight, CONFIG, scaling=2.0)
    assert svd_devices == ["cuda", "cpu"]
    # the singular vectors' signs may differ between the two SVDs: compare the per-expert products B_j A_j
    d = CONFIG.expert_rank
    for j in range(CONFIG.num_experts):
        block = slice(j * d, (j + 1) * d)
        torch.testing.assert_close(B[:, block] @ A[block], cpu_B[:, block] @ cpu_A[block], rtol=1e-4, atol=1e-5)
