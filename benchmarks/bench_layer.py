"""One layer, forward + backward: fused GoatLinear vs the reference's per-expert loop vs PEFT LoRA vs nn.Linear.

Why: DESIGN §2 promises that the fused forward "costs the same as one rank-r LoRA" and never loops over
experts. This measures both claims at n = m in {256, ..., 2048}, T = batch x seq tokens, E = 8, k = 2 and
total rank r = 32 (d = 4 per expert), fp32. x requires grad (a layer inside a network), the upstream gradient
is a fixed random tensor. Variants run interleaved, round by round, on the same input; we report medians.

"adapter only" repeats the measurement with the frozen W0 x replaced by a zero stub, so that the method's own
cost is visible where the frozen matmul dominates (the 5x loop target is about this part).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from patched_layers import patched_copies
from peft import LoraConfig, get_peft_model
from torch import nn

from goat_hf import GoatConfig, GoatLinear

Variant = Callable[[], None]


class LoopGoatLinear(nn.Module):
    """The reference code's dispatch (GOAT-PEFT, Mixtral-style): a Python loop over experts.

    The frozen weight holds W_res = W0 - c*s*sum_j B0_j A0_j (the reference edits W0 in place), so unlike
    GoatLinear it pays no residual term; it also computes no balance loss. Both favour the loop.
    """

    def __init__(self, goat: GoatLinear) -> None:
        super().__init__()
        E, d, n, m = goat.num_experts, goat.expert_rank, goat.in_features, goat.out_features
        self.num_experts, self.top_k, self.scaling = E, goat.top_k, goat.scaling
        with torch.no_grad():
            w_res = goat.base_layer.weight - goat.init_cof * goat.scaling * goat.residual_B @ goat.residual_A
        self.base_layer = nn.Linear(n, m, bias=False).requires_grad_(False)
        self.base_layer.weight.data.copy_(w_res)
        self.router = nn.Linear(n, E, bias=False)
        self.router.weight.data.copy_(goat.router.weight)
        self.lora_A = nn.ModuleList(nn.Linear(n, d, bias=False) for _ in range(E))
        self.lora_B = nn.ModuleList(nn.Linear(d, m, bias=False) for _ in range(E))
        for j in range(E):
            self.lora_A[j].weight.data.copy_(goat.expert_A[j * d : (j + 1) * d])
            self.lora_B[j].weight.data.copy_(goat.expert_B[:, j * d : (j + 1) * d])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        x = x.reshape(-1, x.shape[-1])  # [T, n]
        weights = F.softmax(self.router(x), dim=-1)
        weights, selected = weights.topk(self.top_k, dim=-1)  # [T, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros(x.shape[0], result.shape[-1], dtype=x.dtype, device=x.device)  # [T, m]
        expert_mask = F.one_hot(selected, self.num_experts).permute(2, 1, 0)  # [E, k, T]
        for j in range(self.num_experts):
            slot, tokens = torch.where(expert_mask[j])
            h = self.lora_B[j](self.lora_A[j](x[tokens]))  # [T_j, m]
            out.index_add_(0, tokens, h * weights[tokens, slot, None] * self.scaling)
        return result + out.view(result.shape)


class ZeroBase(nn.Module):
    """Stands in for the frozen Linear in the "adapter only" runs: same output shape, no work, no gradient."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.weight = base.in_features, base.out_features, base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class Wrapper(nn.Module):
    """The smallest model PEFT can wrap: one Linear named `proj`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_layers(n: int, m: int, config: GoatConfig, patched: bool) -> dict[str, nn.Module]:
    base = nn.Linear(n, m, bias=False).requires_grad_(False)
    goat = GoatLinear.from_linear(base, config)
    with torch.no_grad():  # trained-like experts: B no longer equal to its init
        goat.expert_B.add_(0.01 * torch.randn_like(goat.expert_B))
    lora_config = LoraConfig(r=config.r, lora_alpha=config.r, lora_dropout=0.0, target_modules=["proj"])
    lora = get_peft_model(Wrapper(nn.Linear(n, m, bias=False)), lora_config).base_model.model.proj
    layers = {"frozen": base, "lora": lora, "goat": goat, "loop": LoopGoatLinear(goat)}
    return layers | (patched_copies(goat) if patched else {})


def stub_bases(layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The same layers with W0 x replaced by ZeroBase (the frozen Linear itself is dropped)."""
    adapters = {name: layer for name, layer in layers.items() if name != "frozen"}
    for layer in adapters.values():
        layer.base_layer = ZeroBase(layer.base_layer)
    return adapters


def fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Variant:
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        layer(x).backward(grad)

    return step


def time_interleaved(variants: dict[str, Variant], repeats: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Per-variant seconds per call; each round runs every variant once, in a rotating order."""
    inner = {}
    for name, fn in variants.items():  # warm-up, then enough calls per sample for ~30 ms
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        inner[name] = max(1, round(0.03 / (time.perf_counter() - start)))
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            for _ in range(inner[name]):
                variants[name]()
            sync()
            times[name].append((time.perf_counter() - start) / inner[name])
    return times


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of the within-round ratio: robust to the machine slowing down between rounds."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def check_same_function(config: GoatConfig) -> None:
    """The loop (and the patched copies) are only fair comparisons if they compute what GoatLinear computes."""
    layers = build_layers(64, 48, config, patched=True)
    x = torch.randn(4, 32, 64)
    for name in ("loop", "lean", "onepass", "merged"):
        torch.testing.assert_close(layers[name](x), layers["goat"](x), rtol=1e-4, atol=1e-5, msg=name)
        if name != "loop":
            torch.testing.assert_close(layers[name].routing.balance_loss, layers["goat"].routing.balance_loss)


def profile(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, title: str, rows: int) -> None:
    step = fwd_bwd(layer, x, grad)
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    print(f"\n#### {title}: top ops by self CPU time, 10 forward+backward calls\n```")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print("```")


def table(rows: dict[int, dict[str, list[float]]], columns: list[str], ratios: list[tuple[str, str]]) -> None:
    print("| n=m | " + " | ".join(NAMES[c] for c in columns) + " | " + " | ".join(f"{a}/{b}" for a, b in ratios) + " |")
    print("|" + "---:|" * (1 + len(columns) + len(ratios)))
    for n, times in rows.items():
        cells = [f"{1e3 * statistics.median(times[c]):.2f}" for c in columns]
        cells += [f"{median_ratio(times, a, b):.2f}x" for a, b in ratios]
        print(f"| {n} | " + " | ".join(cells) + " |")


NAMES = {
    "frozen": "frozen Linear",
    "lora": "PEFT LoRA",
    "goat": "GOAT fused",
    "loop": "per-expert loop",
    "lean": "GOAT lean (patch)",
    "onepass": "GOAT one-pass (patch)",
    "merged": "GOAT lean, W_res merged",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=int, nargs="+", default=[256, 512, 1024, 2048], help="n = m values")
    parser.add_argument("--tokens", type=int, nargs=2, default=[16, 128], metavar=("BATCH", "SEQ"))
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds per shape")
    parser.add_argument("--r", type=int, default=32, help="total rank (GOAT: over all experts; LoRA: its rank)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--patched", action="store_true", help="also time the proposed GoatLinear.forward")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also profile GOAT and LoRA at n=m=N")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config = GoatConfig(r=args.r, num_experts=args.experts, top_k=args.top_k)
    check_same_function(config)
    batch, seq = args.tokens
    full: dict[int, dict[str, list[float]]] = {}
    alone: dict[int, dict[str, list[float]]] = {}
    for n in args.shapes:
        x = torch.randn(batch, seq, n, device=device, requires_grad=True)
        grad = torch.randn(batch, seq, n, device=device)
        layers = {name: layer.to(device) for name, layer in build_layers(n, n, config, args.patched).items()}
        full[n] = time_interleaved({k: fwd_bwd(v, x, grad) for k, v in layers.items()}, args.repeats, sync)
        alone[n] = time_interleaved({k: fwd_bwd(v, x, grad) for k, v in stub_bases(layers).items()}, args.repeats, sync)
        print(f"n=m={n} done", flush=True)
    print(
        f"\nfp32, {device}, {torch.get_num_threads()} threads, T = {batch}x{seq} = {batch * seq} tokens, "
        f"E={args.experts}, k={args.top_k}, total rank r={args.r} (d={config.expert_rank}); median ms per "
        f"forward+backward over {args.repeats} interleaved rounds, ratios = median of per-round ratios\n"
    )
    print("**Whole layer** (W0 x included)\n")
    table(full, ["frozen", "lora", "goat", "loop"], [("goat", "lora"), ("loop", "goat")])
    print("\n**Adapter only** (W0 x replaced by a zero stub)\n")
    table(alone, ["lora", "goat", "loop"], [("goat", "lora"), ("loop", "goat")])
    if args.patched:
        print("\n**Proposed forward** (whole layer, then adapter only)\n")
        columns = ["lora", "goat", "lean", "onepass", "merged"]
        table(full, columns, [("lean", "lora"), ("onepass", "lora"), ("merged", "lora")])
        print()
        table(alone, columns, [("lean", "lora"), ("onepass", "lora"), ("loop", "onepass")])
    if args.profile:
        n = args.profile
        x = torch.randn(batch, seq, n, device=device, requires_grad=True)
        grad = torch.randn(batch, seq, n, device=device)
        layers = build_layers(n, n, config, patched=False)
        layers |= patched_copies(layers["goat"]) if args.patched else {}
        for name in ("goat", "lora") + (("onepass",) if args.patched else ()):
            profile(layers[name].to(device), x, grad, f"{NAMES[name]}, n=m={n}", rows=20)


if __name__ == "__main__":
    main()
