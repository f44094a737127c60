"""scaling='aligned' (init.py): per-layer s so that the first AdamW step moves the weight eta times as far as full
fine-tuning's, checked against steps simulated from random gradient signs; invariants and exact reload."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import forbid_svd, tiny_llama, token_batch, train_like_
from torch import nn

from goat_hf import GoatConfig, GoatLinear, get_goat_model, goat_layers, load_goat_adapter, save_goat_adapter
from goat_hf.init import scaling_factor
from goat_hf.training_args import GoatTrainingArguments

M, N = 72, 96


def spectrum_weight(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """W0 = U diag(S) Vh with a decaying spectrum, like a pretrained weight's (fp64 factors)."""
    generator = torch.Generator().manual_seed(seed)
    h = min(M, N)
    U, _ = torch.linalg.qr(torch.randn(M, h, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(N, h, generator=generator, dtype=torch.float64))
    S = 4.0 * torch.exp(-torch.arange(h, dtype=torch.float64) / 20) + 0.05
    return U @ torch.diag(S) @ V.T, U, S, V.T


def first_adam_step_ratio(layer: GoatLinear, draws: int = 40, lr: float = 1e-3) -> float:
    """‖ΔW_adapter‖ / ‖ΔW_full‖ after one AdamW step (every entry moves by lr, sign of its gradient), the gradient
    signs drawn at random, each expert weighted by the mean routing weight 1/E; written from the formulas."""
    E, d = layer.num_experts, layer.expert_rank
    generator = torch.Generator().manual_seed(5)
    A, B = layer.expert_A.detach().double(), layer.expert_B.detach().double()
    full = lr * math.sqrt(M * N)  # full fine-tuning: each of the m*n entries moves by lr
    ratios = []
    for _ in range(draws):
        dA = lr * (torch.randint(0, 2, A.shape, generator=generator).double() * 2 - 1)
        dB = lr * (torch.randint(0, 2, B.shape, generator=generator).double() * 2 - 1)
        delta = sum(
            layer.scaling
            / E
            * (
                dB[:, j * d : (j + 1) * d] @ A[j * d : (j + 1) * d]
                + B[:, j * d : (j + 1) * d] @ dA[j * d : (j + 1) * d]
            )
            for j in range(E)
        )
        ratios.append(delta.norm().item() / full)
    return sum(ratios) / draws


def linear_from(W0: torch.Tensor) -> nn.Linear:
    base = nn.Linear(N, M, bias=False)
    with torch.no_grad():
        base.weight.copy_(W0)
    return base


@pytest.mark.parametrize("eta", [1.0, 0.3])
@pytest.mark.parametrize(
    ("init", "num_experts", "r"),
    [("goat", 8, 8), ("goat", 4, 16), ("pissa", 8, 16), ("goat", 1, 8), ("zero", 8, 8), ("zero", 1, 8)],
)
def test_first_adam_step_has_eta_times_full_fine_tunings_norm(init, num_experts, r, eta):
    W0, *_ = spectrum_weight()
    config = GoatConfig(r=r, num_experts=num_experts, top_k=1, init=init, scaling="aligned", eta=eta)
    layer = GoatLinear.from_linear(linear_from(W0.float()), config, torch.Generator().manual_seed(0))
    assert first_adam_step_ratio(layer) == pytest.approx(eta, rel=0.05)


def test_aligned_svd_experts_are_still_the_segments_over_rho():
    """s * B_j A_j = U_j S_j Vh_j / rho for the aligned s too, and the layer computes with W_res = W0 - c * sum_j
    U_j S_j Vh_j / rho: read from its forward with the experts silenced, against the SVD computed here."""
    W0, U, S, Vh = spectrum_weight()
    config = GoatConfig(r=8, num_experts=4, top_k=2, scaling="aligned", rho=10.0)
    layer = GoatLinear.from_linear(linear_from(W0.float()), config)
    s, d, t = layer.scaling, 2, min(M, N) // 4
    assert s != scaling_factor(GoatConfig(r=8, num_experts=4), N)
    segments = []
    for j in range(4):
        idx = list(range(j * t, j * t + d))
        product = s * layer.expert_B[:, j * d : (j + 1) * d].double() @ layer.expert_A[j * d : (j + 1) * d].double()
        segments.append(U[:, idx] @ torch.diag(S[idx]) @ Vh[idx] / 10.0)
        torch.testing.assert_close(product, segments[j], rtol=0, atol=1e-5)
    with torch.no_grad():
        layer.expert_B.zero_()  # the experts add nothing: the output is W_res x
        W_res = layer(torch.eye(N)).double().T  # [m, n]
    torch.testing.assert_close(W_res, W0 - config.init_cof * sum(segments), rtol=0, atol=1e-5)


def test_aligned_scaling_is_per_layer_and_reloads_exactly_without_svd(tmp_path, monkeypatch):
    config = GoatConfig(r=16, num_experts=8, top_k=2, scaling="aligned")
    model = train_like_(get_goat_model(tiny_llama(seed=0), config))
    scalings = {name: layer.scaling for name, layer in goat_layers(model).items()}
    assert len(set(scalings.values())) > 1  # it follows each layer's spectrum and shape
    batch = token_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    folder = save_goat_adapter(model, tmp_path / "adapter")
    forbid_svd(monkeypatch)
    fresh = load_goat_adapter(tiny_llama(seed=0), folder)
    assert {name: layer.scaling for name, layer in goat_layers(fresh).items()} == scalings
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)


def test_scaling_factor_refuses_aligned_without_the_weight():
    with pytest.raises(ValueError, match="depends on the weight; use scaled_expert_factors"):
        scaling_factor(GoatConfig(scaling="aligned"), 64)


def test_aligned_from_the_command_line(tmp_path):
    args = GoatTrainingArguments(output_dir=str(tmp_path), goat_scaling="aligned", use_cpu=True)
    assert args.to_goat_config().scaling == "aligned"
