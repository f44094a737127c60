"""init.py: SVD segments per init, expert factors against a weight with a known SVD, the scaling s."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from goat_hf import GoatConfig, GoatLinear
from goat_hf.init import expert_factors, scaling_factor, segment_starts

M, N = 40, 48  # W0 is out x in = m x n; h = min(m, n) = 40
H = min(M, N)


def known_svd(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0 = U diag(S) Vh with orthonormal U, V and distinct, decreasing singular values (all fp64)."""
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(M, H, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(N, H, generator=generator, dtype=torch.float64))
    S = torch.linspace(8.0, 0.5, H, dtype=torch.float64)  # gaps of ~0.19: well-separated singular vectors
    return U @ torch.diag(S) @ V.T, U, S, V.T


def expected_segments(init: str, num_experts: int, r: int) -> list[list[int]]:
    """The singular indices of each expert, written out from DESIGN §2."""
    d, t = r // num_experts, H // num_experts
    if init == "goat":
        return [list(range(j * t, j * t + d)) for j in range(num_experts)]
    if init == "goat_mini":
        return [list(range((j + 1) * t - d, (j + 1) * t)) for j in range(num_experts)]
    if init == "pissa":
        return [list(range(j * d, (j + 1) * d)) for j in range(num_experts)]
    if init == "milora":
        return [list(range(H - r + j * d, H - r + (j + 1) * d)) for j in range(num_experts)]
    raise ValueError(init)


SEGMENT_CASES = [(E, r) for E, r in [(1, 8), (2, 8), (4, 8), (8, 16), (8, 32)]]
SEGMENT_IDS = [f"E{E}-r{r}" for E, r in SEGMENT_CASES]


@pytest.mark.parametrize(("num_experts", "r"), SEGMENT_CASES, ids=SEGMENT_IDS)
@pytest.mark.parametrize("init", ["goat", "goat_mini", "pissa", "milora"])
def test_segment_starts(init, num_experts, r):
    config = GoatConfig(r=r, num_experts=num_experts, top_k=1, init=init)
    starts = segment_starts(H, config)
    assert starts == [segment[0] for segment in expected_segments(init, num_experts, r)]


def test_goat_segments_spread_over_the_spectrum():
    config = GoatConfig(r=16, num_experts=8, top_k=2)  # h = 40: chunks of t = 5, d = 2
    assert segment_starts(H, config) == [0, 5, 10, 15, 20, 25, 30, 35]
    mini = GoatConfig(r=16, num_experts=8, top_k=2, init="goat_mini")
    assert segment_starts(H, mini) == [3, 8, 13, 18, 23, 28, 33, 38]


def test_random_segments_are_seeded_reproducible_and_in_range():
    config = GoatConfig(r=16, num_experts=8, top_k=2, init="random")
    draws = [segment_starts(H, config, torch.Generator().manual_seed(seed)) for seed in (3, 3, 4)]
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]
    for starts in draws:
        assert len(starts) == 8 and all(0 <= start <= H - config.expert_rank for start in starts)
    many = segment_starts(H, config, torch.Generator().manual_seed(0)) + sum(
        (segment_starts(H, config, torch.Generator().manual_seed(s)) for s in range(1, 50)), []
    )
    assert min(many) == 0 and max(many) == H - config.expert_rank  # the whole range is reachable


def expert_products(A: torch.Tensor, B: torch.Tensor, scaling: float, num_experts: int) -> list[torch.Tensor]:
    """s * B_j A_j for each expert, from the stacked factors."""
    d = A.shape[0] // num_experts
    return [scaling * B[:, j * d : (j + 1) * d].double() @ A[j * d : (j + 1) * d].double() for j in range(num_experts)]


def triplet_product(U, S, Vh, indices: list[int], rho: float) -> torch.Tensor:
    return U[:, indices] @ torch.diag(S[indices]) @ Vh[indices] / rho


@pytest.mark.parametrize("svd_dtype", ["float32", "float64"])
@pytest.mark.parametrize(("num_experts", "r"), SEGMENT_CASES, ids=SEGMENT_IDS)
@pytest.mark.parametrize("init", ["goat", "goat_mini", "pissa", "milora", "random"])
def test_expert_products_are_the_known_svd_segments(init, num_experts, r, svd_dtype):
    """s * B_j A_j = U_j S_j V_j^T / rho, compared as products (each singular vector has a free sign)."""
    W0, U, S, Vh = known_svd()
    config = GoatConfig(r=r, num_experts=num_experts, top_k=1, init=init, svd_dtype=svd_dtype, rho=7.0)
    scaling = scaling_factor(config, N)
    A, B = expert_factors(W0.float(), config, scaling, torch.Generator().manual_seed(11))
    assert A.shape == (r, N) and B.shape == (M, r) and A.dtype == B.dtype == torch.float32
    if init == "random":
        starts = segment_starts(H, config, torch.Generator().manual_seed(11))
        segments = [list(range(start, start + config.expert_rank)) for start in starts]
    else:
        segments = expected_segments(init, num_experts, r)
    for product, indices in zip(expert_products(A, B, scaling, num_experts), segments, strict=True):
        torch.testing.assert_close(product, triplet_product(U, S, Vh, indices, rho=7.0), rtol=0, atol=2e-5)
    # B_j and A_j carry sqrt(S_j / (s * rho)) each: the factors are balanced
    torch.testing.assert_close(B.double().norm(dim=0), A.double().norm(dim=1), rtol=1e-4, atol=0)


def test_zero_init_is_kaiming_a_and_zero_b():
    config = GoatConfig(r=16, num_experts=8, top_k=2, init="zero")
    A, B = expert_factors(torch.randn(M, N), config, 1.0, torch.Generator().manual_seed(0))
    A2, _ = expert_factors(torch.randn(M, N), config, 1.0, torch.Generator().manual_seed(0))
    assert torch.count_nonzero(B) == 0 and B.shape == (M, 16)
    assert torch.equal(A, A2)  # seeded
    bound = 1.0 / math.sqrt(N)  # kaiming_uniform_(a=sqrt(5)) over fan_in = n, as PEFT's LoRA A
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound


@pytest.mark.parametrize("init_cof", [None, 0.5])
@pytest.mark.parametrize("init", ["goat", "goat_mini", "pissa", "milora", "random"])
def test_residual_is_w0_minus_c_over_rho_times_the_segments_of_a_known_svd(init, init_cof):
    """W_res = W0 - (c/rho) * sum_j U_j S_j V_j^T (Theorem 3.4 with s*B_j A_j = U_j S_j V_j^T / rho), read off the
    layer's output with the experts' B at zero (y = W_res x): catches a wrong c, rho, segment or sign."""
    W0, U, S, Vh = known_svd()
    base = nn.Linear(N, M, bias=False)
    with torch.no_grad():
        base.weight.copy_(W0)
    config = GoatConfig(r=16, num_experts=8, top_k=2, init=init, init_cof=init_cof, rho=7.0)
    layer = GoatLinear.from_linear(base, config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.expert_B.zero_()
        W_res = layer(torch.eye(N)).double().T  # column i is W_res e_i
    c = 1 / 8 if init_cof is None else init_cof
    if init == "random":  # the starts GoatLinear.from_linear draws first from the generator
        starts = segment_starts(H, config, torch.Generator().manual_seed(0))
        indices = sum((list(range(start, start + 2)) for start in starts), [])
    else:
        indices = sum(expected_segments(init, 8, 16), [])
    expected = W0 - c * triplet_product(U, S, Vh, indices, rho=7.0)
    assert (W_res - W0).abs().max() > 1e-3  # the residual really differs from W0
    torch.testing.assert_close(W_res, expected, rtol=0, atol=1e-5)
    assert torch.equal(base.weight, W0.float())  # W0 itself is not modified


def test_goat_scaling_is_theorem_3_5():
    config = GoatConfig(r=8, num_experts=4, top_k=2, eta=0.1)  # d = 2
    assert scaling_factor(config, in_features=48) == pytest.approx(math.sqrt(3 * 48 * 0.1 / 2))
    assert scaling_factor(GoatConfig(r=32, num_experts=8), 4096) == pytest.approx(math.sqrt(3 * 4096 / 4))
    # n is in_features, not out_features
    layer = GoatLinear.from_linear(nn.Linear(N, M), config)
    assert layer.scaling == pytest.approx(math.sqrt(3 * N * 0.1 / 2))


def test_other_scalings():
    alpha = GoatConfig(r=16, num_experts=4, scaling="alpha", lora_alpha=32)  # d = 4
    assert scaling_factor(alpha, 48) == pytest.approx(32 / 4)
    rslora = GoatConfig(r=16, num_experts=4, scaling="rslora", lora_alpha=32)
    assert scaling_factor(rslora, 48) == pytest.approx(32 / 2)
    fixed = GoatConfig(r=16, num_experts=4, scaling=2.5)
    assert scaling_factor(fixed, 48) == 2.5
    assert GoatLinear.from_linear(nn.Linear(N, M), fixed).scaling == 2.5


@pytest.mark.parametrize("init", ["goat", "pissa"])
def test_single_expert_is_pissa(init):
    """E = 1: "goat" takes the top r triplets (one chunk); with rho = 1 it is PEFT's PiSSA, factors and residual."""
    W0, *_ = known_svd()
    r, alpha = 8, 16.0
    peft_model = nn.Sequential(nn.Linear(N, M, bias=False))
    with torch.no_grad():
        peft_model[0].weight.copy_(W0)
    peft_config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights="pissa")
    peft_layer = inject_adapter_in_model(peft_config, peft_model)[0]
    peft_s = peft_layer.scaling["default"]
    peft_delta = peft_s * peft_layer.lora_B["default"].weight.double() @ peft_layer.lora_A["default"].weight.double()

    base = nn.Linear(N, M, bias=False)
    with torch.no_grad():
        base.weight.copy_(W0)
    config = GoatConfig(r=r, num_experts=1, top_k=1, init=init, rho=1.0, scaling="alpha", lora_alpha=alpha)
    layer = GoatLinear.from_linear(base, config)
    assert layer.scaling == pytest.approx(peft_s)
    (delta,) = expert_products(layer.expert_A, layer.expert_B, layer.scaling, 1)
    torch.testing.assert_close(delta, peft_delta, rtol=0, atol=2e-5)
    W_res = base.weight.double() - layer.scaling * layer.residual_B.double() @ layer.residual_A.double()
    torch.testing.assert_close(W_res, peft_layer.base_layer.weight.double(), rtol=0, atol=2e-5)


def test_the_svd_runs_on_an_available_accelerator_and_stays_on_a_weights_own(monkeypatch):
    """A CPU model's init uses an accelerator when there is one (then the factors come back); a weight already on
    an accelerator (or the meta device) keeps its SVD there; with none, the CPU."""
    from goat_hf.init import svd_device

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert svd_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda", 0))
    assert svd_device(torch.device("cpu")) == torch.device("cuda", 0)
    assert svd_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert svd_device(torch.device("meta")) == torch.device("meta")
