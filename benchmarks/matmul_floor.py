"""The multiply-add ratio behind issue 10's timings: matmul work per token of GOAT and of LoRA on SmolLM2-135M.

Why: bench_model times GOAT / LoRA; this counts how much more matmul arithmetic GOAT does while it keeps its
exactness promises (W0 untouched, so the frozen rank-r residual -c·s·B0·A0 x is computed on every token, in the
forward and in dx). Counted from the model's shapes (built on the meta device, no weights): every adapted Linear
n -> m, the frozen lm_head, and attention at the benchmark's sequence length, counted causally ((seq + 1) / 2 keys
per query; the full square would move the r = 32 ratio by 0.002). Elementwise work (norms, activations, the loss,
AdamW, LoRA's `* scaling` and `+`, GOAT's routing) is not counted: it moves the time ratio towards 1 where both
methods share it, and below the multiply-add ratio where LoRA's own passes cost more than GOAT's.

Per adapted Linear and token, with d = r / E, training step (frozen W0: forward and dx, no dW0):
  base              2·n·m
  LoRA              3·r·(n + m)             forward x·A, ·B; backward dh = dy·B, dB, dA, dx = dh·A
  GOAT (fused.py)   n·(2·(E + 2r) + E + r) + m·(2·2r + r)
                    forward x·[W_r; A; A0] and [B | B0]; backward dy·[B | B0], dB, [dW_r; dA], dx
and a no-grad forward: base n·m, LoRA r·(n + m), GOAT n·(E + 2r) + m·2r. Without the residual (init="zero",
or W_res merged into W0 as the reference does), 2r becomes r.

    python benchmarks/matmul_floor.py            # r = 8 and 32, E = 8, sequence 128
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from goat_hf.tasks.assets import smollm2_path

ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(model: nn.Module) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(in, out) of the adapted Linears, and of the other (frozen, unadapted) ones, e.g. the lm_head."""
    adapted, other = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shape = (module.in_features, module.out_features)
            (adapted if name.rsplit(".", 1)[-1] in ADAPTED else other).append(shape)
    return adapted, other


def lora_macs(n: int, m: int, r: int, step: bool) -> int:
    """Multiply-adds per token of PEFT LoRA's adapter matmuls (the base's are counted apart)."""
    return (3 if step else 1) * r * (n + m)


def goat_macs(n: int, m: int, r: int, E: int, residual: bool, step: bool) -> int:
    """Multiply-adds per token of the fused GOAT layer's adapter matmuls (fused.py; the base's counted apart)."""
    rr = 2 * r if residual else r  # the [W_r; A; A0] rows past the router's, the [B | B0] columns
    if not step:
        return n * (E + rr) + m * rr
    return n * (2 * (E + rr) + E + r) + m * (2 * rr + r)


def per_token_macs(adapted, other, attention: float, r: int, E: int, residual: bool) -> dict[str, float]:
    """Multiply-adds per token: base, LoRA and GOAT, for a training step and for a no-grad forward."""
    linears = sum(n * m for n, m in adapted + other)
    base_fwd = linears + attention
    base_step = 2 * linears + 3 * attention  # frozen Linears: forward and dx; attention: forward, dQ·K/dK·Q, dP, dV
    lora = {step: sum(lora_macs(n, m, r, step) for n, m in adapted) for step in (False, True)}
    goat = {step: sum(goat_macs(n, m, r, E, residual, step) for n, m in adapted) for step in (False, True)}
    return {
        "step_goat_over_lora": (base_step + goat[True]) / (base_step + lora[True]),
        "eval_goat_over_lora": (base_fwd + goat[False]) / (base_fwd + lora[False]),
        "adapter_step_goat_over_lora": goat[True] / lora[True],
        "base_fwd_macs": base_fwd,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    config = AutoConfig.from_pretrained(smollm2_path())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapted, other = linear_shapes(model)
    # causal attention, per token and layer: Q·K^T and P·V over (seq + 1) / 2 keys on average
    width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    attention = config.num_hidden_layers * 2 * width * (args.seq + 1) / 2
    result = {}
    print("| r | with | step GOAT/LoRA | eval GOAT/LoRA | adapter matmuls in a step, GOAT/LoRA |")
    print("|---|---|---:|---:|---:|")
    for r in args.ranks:
        for residual in (True, False):
            floor = per_token_macs(adapted, other, attention, r, args.experts, residual)
            result[f"r{r}{'' if residual else '_no_residual'}"] = floor
            what = "the frozen residual (W0 untouched)" if residual else "no residual (W_res merged into W0)"
            print(
                f"| {r} | {what} | {floor['step_goat_over_lora']:.3f} | {floor['eval_goat_over_lora']:.3f} | "
                f"{floor['adapter_step_goat_over_lora']:.2f} |"
            )
    print(json.dumps({"adapted_linears": len(adapted), "other_linears": other}))
    return result


if __name__ == "__main__":
    main()
