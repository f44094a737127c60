"""Fingerprints of the base model's tensors, so that an adapter is only loaded onto the base it was trained on.

Every tensor of the base that the adapted model's output depends on is covered: the adapted Linears' W0 and
biases, embeddings, norms, the output head, persistent buffers. Hashing gigabytes would be slow, so each tensor
gets five numbers from one matrix-vector product with a fixed +-1 probe: a change of any entry moves them.
"""

from __future__ import annotations

from typing import Any

import torch

from .distributed import full_shape, gathered

SAME_DTYPE_TOLERANCE = (1e-4, 1e-6)  # (rtol, atol relative to the largest number): float rounding of the sums
CROSS_DTYPE_TOLERANCE = (3e-2, 2e-3)  # a bf16 copy of the same base moves the sums by ~0.4 %


def tensor_fingerprint(tensor: torch.Tensor) -> list[float]:
    """Sums of T @ p for rows of T (the last dim) and a +-1 probe p seeded by the row length, plus sum |T|.

    A sharded tensor (FSDP2 DTensor, ZeRO-3 parameter) is gathered first, a collective: every rank calls this.
    """
    with gathered(tensor) as whole:
        return _fingerprint(whole)


def _fingerprint(tensor: torch.Tensor) -> list[float]:
    if tensor.numel() == 0:
        return [0.0] * 5
    rows = tensor.detach().reshape(-1, tensor.shape[-1] if tensor.dim() else 1).float()  # a view when fp32
    n = rows.shape[1]
    probe = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(n)).to(rows.device) * 2.0 - 1.0
    v, total = rows @ probe, rows.abs().sum()  # [rows], sum |T|: fp32, PyTorch's cascade sum (~1e-8 relative)
    if not (v.isfinite().all() and total.isfinite()):
        # -inf causal-mask buffers, or finfo.min-filled ones whose sums overflow fp32: a cleaned float64 copy
        rows = torch.nan_to_num(rows.double(), nan=7.0, posinf=11.0, neginf=-13.0)
        v, total = rows @ probe.double(), rows.abs().sum()
    v = v.double()
    sums = [v.sum(), v[::2].sum(), v.abs().sum(), v.square().sum().sqrt(), total.double()]
    return torch.stack(sums).tolist()


def fingerprint_record(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """{name: shape, dtype, fingerprint} for goat_config.json; None where a tensor has no data here (meta)."""
    return {
        name: {
            "shape": list(full_shape(tensor)),
            "dtype": dtype_name(tensor.dtype),
            "fingerprint": None if tensor.is_meta else tensor_fingerprint(tensor),
        }
        for name, tensor in tensors.items()
    }


def differing_tensors(saved: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Names that differ between the recorded base and `tensors`, by kind: missing, extra, shape, values, unchecked."""
    found: dict[str, list[str]] = {
        "missing": [],
        "extra": sorted(set(tensors) - set(saved)),
        "shape": [],
        "values": [],
        "unchecked": [],
    }
    for name, record in saved.items():
        tensor = tensors.get(name)
        if tensor is None:
            found["missing"].append(name)
        elif list(full_shape(tensor)) != record["shape"]:
            found["shape"].append(name)
        elif record["fingerprint"] is None or tensor.is_meta:
            found["unchecked"].append(name)
        elif not _close(tensor_fingerprint(tensor), record["fingerprint"], dtype_name(tensor.dtype) == record["dtype"]):
            found["values"].append(name)
    return found


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _close(here: list[float], saved: list[float], same_dtype: bool) -> bool:
    rtol, atol = SAME_DTYPE_TOLERANCE if same_dtype else CROSS_DTYPE_TOLERANCE
    # The signed sums can be near 0, where rounding is large relative to them: bound it by the largest number.
    a, b = torch.tensor(here, dtype=torch.float64), torch.tensor(saved, dtype=torch.float64)
    if not (a.isfinite().all() and b.isfinite().all()):  # only a fingerprint saved by goat_hf <= 0.3.0 can be
        return bool(torch.equal(a, b))  # non-finite (an overflowing mask buffer): equal or not, never a crash
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol * b.abs().max().item()))
