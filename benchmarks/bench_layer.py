"""One layer, forward + backward: fused GoatLinear vs PEFT LoRA vs the reference's per-expert loop vs nn.Linear.

Why: DESIGN §2 promises that the fused forward costs what one rank-r LoRA costs and never loops over experts;
issue 10 sets the bar (GOAT / LoRA <= 1.10 at 384->256 and 1024->1024, >= 3.5x faster than the loop at
384->256; r = 16, E = 8, k = 2, T = 16 x 128, one thread). x requires grad (a layer inside a network), the
upstream gradient is a fixed random tensor. Variants run interleaved, round by round, on the same input; we
report medians. "GOAT autograd" is the same layer computed with autograd ops (goat_hf 0.2's forward).

"adapter only" repeats the measurement with the frozen W0 x replaced by a zero stub, so that the method's own
cost is visible where the frozen matmul dominates.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from autograd_path import use_autograd_path
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


def build_layers(n: int, m: int, config: GoatConfig) -> dict[str, nn.Module]:
    base = nn.Linear(n, m, bias=False).requires_grad_(False)
    goat = GoatLinear.from_linear(base, config)
    with torch.no_grad():  # trained-like experts: B no longer equal to its init
        goat.expert_B.add_(0.01 * torch.randn_like(goat.expert_B))
    lora_config = LoraConfig(r=config.r, lora_alpha=config.r, lora_dropout=0.0, target_modules=["proj"])
    lora = get_peft_model(Wrapper(nn.Linear(n, m, bias=False)), lora_config).base_model.model.proj
    autograd = use_autograd_path(copy.deepcopy(goat))
    return {"frozen": base, "lora": lora, "goat": goat, "autograd": autograd, "loop": LoopGoatLinear(goat)}


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
    """The loop and the autograd path are only fair comparisons if they compute what GoatLinear computes."""
    layers = build_layers(64, 48, config)
    x = torch.randn(4, 32, 64)
    for name in ("loop", "autograd"):
        torch.testing.assert_close(layers[name](x), layers["goat"](x), rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(layers["autograd"].routing.balance_loss, layers["goat"].routing.balance_loss)


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


def table(rows: dict[str, dict[str, list[float]]], columns: list[str], ratios: list[tuple[str, str]]) -> str:
    header = [NAMES[c] for c in columns] + [f"{a}/{b}" for a, b in ratios]
    lines = ["| n→m | " + " | ".join(header) + " |"]
    lines.append("|" + "---:|" * (1 + len(columns) + len(ratios)))
    for shape, times in rows.items():
        cells = [f"{1e3 * statistics.median(times[c]):.2f}" for c in columns]
        cells += [f"{median_ratio(times, a, b):.2f}x" for a, b in ratios]
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


NAMES = {
    "frozen": "frozen Linear",
    "lora": "PEFT LoRA",
    "goat": "GOAT fused",
    "autograd": "GOAT autograd (0.2)",
    "loop": "per-expert loop",
}


def parse_shape(text: str) -> tuple[int, int]:
    """'384x256' -> (384, 256): in_features x out_features; '512' -> (512, 512)."""
    n, _, m = text.partition("x")
    return int(n), int(m or n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["384x256", "1024x1024"], help="in x out, e.g. 384x256")
    parser.add_argument("--tokens", type=int, nargs=2, default=[16, 128], metavar=("BATCH", "SEQ"))
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds per shape")
    parser.add_argument("--r", type=int, default=16, help="total rank (GOAT: over all experts; LoRA: its rank)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--profile", default=None, metavar="NxM", help="also profile GOAT and LoRA at this shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, as issue 10 asks)")
    parser.add_argument("--out", type=Path, default=None, help="also write the medians and ratios as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config = GoatConfig(r=args.r, num_experts=args.experts, top_k=args.top_k)
    check_same_function(config)
    batch, seq = args.tokens
    full: dict[str, dict[str, list[float]]] = {}
    alone: dict[str, dict[str, list[float]]] = {}
    for shape in args.shapes:
        n, m = parse_shape(shape)
        x = torch.randn(batch, seq, n, device=device, requires_grad=True)
        grad = torch.randn(batch, seq, m, device=device)
        layers = {name: layer.to(device) for name, layer in build_layers(n, m, config).items()}
        full[shape] = time_interleaved({k: fwd_bwd(v, x, grad) for k, v in layers.items()}, args.repeats, sync)
        adapters = stub_bases(layers)
        alone[shape] = time_interleaved({k: fwd_bwd(v, x, grad) for k, v in adapters.items()}, args.repeats, sync)
        print(f"{shape} done", flush=True)
    print(
        f"\nfp32, {device}, {torch.get_num_threads()} threads, T = {batch}x{seq} = {batch * seq} tokens, "
        f"E={args.experts}, k={args.top_k}, total rank r={args.r} (d={config.expert_rank}); median ms per "
        f"forward+backward over {args.repeats} interleaved rounds, ratios = median of per-round ratios\n"
    )
    ratios = [("goat", "lora"), ("loop", "goat"), ("autograd", "goat")]
    print("**Whole layer** (W0 x included)\n")
    print(table(full, ["frozen", "lora", "goat", "autograd", "loop"], ratios))
    print("\n**Adapter only** (W0 x replaced by a zero stub)\n")
    print(table(alone, ["lora", "goat", "autograd", "loop"], ratios))
    if args.out:
        summary = {
            part: {
                shape: {"median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()}}
                | {f"{a}/{b}": median_ratio(times, a, b) for a, b in ratios}
                for shape, times in rows.items()
            }
            for part, rows in (("whole_layer", full), ("adapter_only", alone))
        }
        settings = {"threads": args.threads, "tokens": batch * seq, "r": args.r, "E": args.experts, "k": args.top_k}
        args.out.write_text(json.dumps({"settings": settings, "device": str(device)} | summary, indent=1))
    if args.profile:
        n, m = parse_shape(args.profile)
        x = torch.randn(batch, seq, n, device=device, requires_grad=True)
        grad = torch.randn(batch, seq, m, device=device)
        layers = build_layers(n, m, config)
        for name in ("goat", "lora"):
            profile(layers[name].to(device), x, grad, f"{NAMES[name]}, {args.profile}", rows=20)


if __name__ == "__main__":
    main()
