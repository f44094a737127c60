"""Pure functions from a pretrained weight W0 (out x in = m x n) to GOAT expert factors and the scaling s.

Expert j gets the singular triplets of a segment of W0's spectrum (DESIGN §2):
    B_j = U_j S_j^(1/2) / sqrt(s*rho),   A_j = S_j^(1/2) Vh_j / sqrt(s*rho)   so   s*B_j*A_j = U_j S_j Vh_j / rho.
"""

from __future__ import annotations

import math

import torch

from .config import GoatConfig


def scaling_factor(config: GoatConfig, in_features: int) -> float:
    """The adapter scaling s; 'goat' is Theorem 3.5's s = sqrt(3*n*eta/d) with n = in_features.

    'aligned' depends on the layer's singular values: see `scaled_expert_factors`.
    """
    d = config.expert_rank
    if config.scaling == "aligned":
        raise ValueError("scaling='aligned' depends on the weight; use scaled_expert_factors.")
    if config.scaling == "goat":
        return math.sqrt(3.0 * in_features * config.eta / d)
    if config.scaling == "alpha":
        return config.lora_alpha / d
    if config.scaling == "rslora":
        return config.lora_alpha / math.sqrt(d)
    return float(config.scaling)


def segment_starts(h: int, config: GoatConfig, generator: torch.Generator | None = None) -> list[int]:
    """First singular index of each expert's d-long segment, for h = min(m, n) singular values."""
    E, d, r = config.num_experts, config.expert_rank, config.r
    t = h // E  # chunk length
    if config.init == "goat":
        return [j * t for j in range(E)]
    if config.init == "goat_mini":
        return [(j + 1) * t - d for j in range(E)]
    if config.init == "pissa":
        return [j * d for j in range(E)]
    if config.init == "milora":
        return [h - r + j * d for j in range(E)]
    if config.init == "random":
        return torch.randint(0, h - d + 1, (E,), generator=generator).tolist()
    raise ValueError(f"init={config.init!r} has no SVD segments.")


def svd_device(weight_device: torch.device) -> torch.device:
    """Where a layer's SVD runs: the weight's accelerator, or an available accelerator for a CPU weight (the
    init of a 7B model is hundreds of SVDs), else the CPU. The factors go back to the weight's device."""
    if weight_device.type != "cpu":
        return weight_device
    if torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return weight_device


def expert_factors(
    weight: torch.Tensor, config: GoatConfig, scaling: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked expert factors (A [E*d, n], B [m, E*d]) in fp32 on the weight's device (the SVD on `svd_device`)."""
    m, n = weight.shape
    if config.init == "zero":
        A = torch.empty(config.r, n, dtype=torch.float32)  # drawn on the CPU so a seed means the same on any device
        for expert in A.view(config.num_experts, config.expert_rank, n):  # Kaiming per expert, as PEFT's LoRA A
            torch.nn.init.kaiming_uniform_(expert, a=math.sqrt(5), generator=generator)
        return A.to(weight.device), torch.zeros(m, config.r, device=weight.device, dtype=torch.float32)

    device = svd_device(weight.device)
    matrix = weight.detach().to(device=device, dtype=getattr(torch, config.svd_dtype))
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    starts = segment_starts(min(m, n), config, generator)
    index = torch.cat([torch.arange(start, start + config.expert_rank) for start in starts]).to(device)
    root_s = S[index].sqrt() / math.sqrt(scaling * config.rho)  # [r]
    B = U[:, index] * root_s  # [m, r]
    A = root_s[:, None] * Vh[index]  # [r, n]
    back = {"device": weight.device, "dtype": torch.float32}
    return A.to(**back).contiguous(), B.to(**back).contiguous()


def aligned_scaling(config: GoatConfig, unit_A: torch.Tensor, unit_B: torch.Tensor) -> float:
    """s for which the weight change implied by the first AdamW step has eta times the norm of full fine-tuning's.

    At its first step AdamW moves every trainable entry by lr (sign of the gradient), so full fine-tuning changes
    W0 by a norm of lr*sqrt(m*n). The experts (rows of A orthogonal, columns of B orthogonal, mean routing weight
    1/E) change s*sum_j w_j*(dB_j A_j + B_j dA_j) by lr*s*sqrt(sum_j m*|A_j|^2 + n*|B_j|^2)/E. `unit_A`/`unit_B`
    are the factors at s = 1: SVD segments shrink as 1/sqrt(s) (s*B*A stays U S Vh / rho), Kaiming ones do not.
    benchmarks/gradient_alignment.py measures the ratio this aims at 1.
    """
    m, n = unit_B.shape[0], unit_A.shape[1]
    E = config.num_experts
    energy = (m * unit_A.double().pow(2).sum() + n * unit_B.double().pow(2).sum()).item() / E**2
    if config.init == "zero":  # |A| does not depend on s: ratio = s*sqrt(energy/(m*n))
        return config.eta * math.sqrt(m * n / energy)
    return config.eta**2 * m * n / energy  # ratio = sqrt(s*energy/(m*n))


def scaled_expert_factors(
    weight: torch.Tensor, config: GoatConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, s) for one layer: the stacked expert factors and the scaling they were shrunk for (one SVD)."""
    m, n = weight.shape
    if config.scaling != "aligned":
        scaling = scaling_factor(config, n)
        return (*expert_factors(weight, config, scaling, generator), scaling)
    A, B = expert_factors(weight, config, 1.0, generator)
    scaling = aligned_scaling(config, A, B)
    if config.init == "zero":
        return A, B, scaling
    shrink = 1.0 / math.sqrt(scaling)
    return A * shrink, B * shrink, scaling
