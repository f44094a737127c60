"""What one decoded token costs per adapted layer: GOAT vs PEFT LoRA vs the merged Linear, layer by layer.

Why: issue 24 asks, where the decode goals are not met, what remains per layer. bench_decode.py times whole tokens;
this times the layers alone, as a decode step meets them: SmolLM2-135M's seven adapted shapes per block (q, k, v, o,
gate, up, down), six blocks in a row so that the frozen weights stream through the caches between the small ops as
they do in the model (each op then costs more than in a hot loop), one token per sequence, no_grad, one thread.
Each variant is the real module: nn.Linear ("merged": what a merged LoRA costs), a PEFT LoRA layer (r = 8, unmerged),
GoatLinear on its default inference path and after prepare_for_inference (E = 8, top-2, r = 8), both through the CPU
decode kernel (goat_hf/cpu_kernel.py), and the prepared layer on ATen ops ("prepared, ATen ops"). Variants alternate
round by round; medians. The layers' weights are random (the timings depend on shapes only).

    python benchmarks/bench_decode_layers.py --out benchmarks/results/bench_decode_layers_cpu.json

With --compile, the chain of each variant is one torch.compile'd graph (fullgraph, inductor's Python wrapper), as a
compiled decode step meets its layers: merged, PEFT LoRA, GOAT's default layer, the same with init="zero" (no frozen
residual: what the residual costs a compiled layer) and a prepared one ([W_res | s·B]).

    python benchmarks/bench_decode_layers.py --compile --batch-sizes 1 --rounds 61 \
        --out benchmarks/results/bench_decode_layers_cpu_compiled.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from bench_decode import GOAT
from bench_model import RANDOM_BASE_CONFIG, lora_model
from torch import nn

from goat_hf import GoatLinear
from goat_hf.cpu_kernel import kernel_for
from goat_hf.decode import attach_kernel_, extend_base_weight_
from goat_hf.prepare import fold_for_serving


def block_shapes() -> list[tuple[int, int]]:
    """(in, out) of q, k, v, o, gate, up, down in one SmolLM2-135M block, from its config."""
    config = json.loads(RANDOM_BASE_CONFIG.read_text())
    hidden, mlp = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    return [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, mlp), (hidden, mlp), (mlp, hidden)]


SHAPES = block_shapes()


def build_layers(blocks: int) -> dict[str, list[nn.Module]]:
    torch.manual_seed(0)
    merged = [nn.Linear(n, m, bias=False).requires_grad_(False) for n, m in SHAPES * blocks]
    goat = [GoatLinear.from_linear(copy.deepcopy(lin), GOAT).eval().requires_grad_(False) for lin in merged]
    prepared = [GoatLinear.from_linear(copy.deepcopy(lin), GOAT).eval().requires_grad_(False) for lin in merged]
    aten = [GoatLinear.from_linear(copy.deepcopy(lin), GOAT).eval().requires_grad_(False) for lin in merged]
    for layer in prepared + aten:
        layer.prepared = fold_for_serving(layer)  # what prepare_for_inference does to each layer of a model
    for layer in prepared:
        attach_kernel_(layer.prepared, kernel_for(layer.base_layer.weight))  # as prepare_for_inference does
    holder = nn.ModuleDict({str(i): copy.deepcopy(lin) for i, lin in enumerate(merged)})
    lora = lora_model(holder, list(holder), r=GOAT.r).eval()  # the PEFT config bench_decode's LoRA variant uses
    lora_layers = [lora.base_model.model[str(i)] for i in range(len(merged))]
    return {"merged": merged, "lora": lora_layers, "goat": goat, "goat prepared": prepared, "prepared, ATen ops": aten}


def build_compiled_layers(blocks: int) -> dict[str, list[nn.Module]]:
    """The variants --compile compares: the prepared one with its [W_res | s·B] (what prepare_for_inference gives an
    fp32 layer), and GOAT without a residual (init="zero") beside the default."""
    variants = build_layers(blocks)
    torch.manual_seed(0)
    no_residual = replace(GOAT, init="zero")
    variants["goat, no residual"] = [
        GoatLinear.from_linear(copy.deepcopy(base), no_residual).eval().requires_grad_(False)
        for base in variants["merged"]
    ]
    for layer in variants["goat prepared"]:
        extend_base_weight_(layer.base_layer.weight, layer.prepared)
    del variants["prepared, ATen ops"]  # compiled, no layer calls the CPU kernel: the same graph as "goat prepared"
    return variants


class Chain(nn.Module):
    """The layers in a row, each on the input of its width: one graph for torch.compile."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, inputs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [layer(inputs[layer.in_features]) for layer in self.layers]


def chain(layers: list[nn.Module], inputs: dict[int, torch.Tensor], compiled: bool = False) -> Callable[[], None]:
    if compiled:
        step = torch.compile(Chain(layers), fullgraph=True)
        return lambda: step(inputs)

    def run() -> None:
        for layer in layers:
            layer(inputs[layer.in_features])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--calls", type=int, default=10, help="passes over the chain per timed round")
    parser.add_argument("--compile", action="store_true", help="each variant's chain as one torch.compile'd graph")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = build_compiled_layers(args.blocks) if args.compile else build_layers(args.blocks)
    count = len(SHAPES) * args.blocks
    results = {}
    for batch in args.batch_sizes:
        inputs = {n: torch.randn(batch, 1, n) for n in {n for n, _ in SHAPES}}
        runs = {name: chain(layers, inputs, args.compile) for name, layers in variants.items()}
        times = {name: [] for name in runs}
        with torch.no_grad():
            for run in runs.values():
                run()
            for _ in range(args.rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        run()
                    times[name].append((time.perf_counter() - start) / args.calls / count * 1e6)
        us = {name: statistics.median(values) for name, values in times.items()}
        results[str(batch)] = {"us_per_layer": us, "over_merged": {n: us[n] - us["merged"] for n in us}}
    others = [name for name in variants if name != "merged"]
    mode = "one torch.compile'd graph per chain" if args.compile else "eager"
    lines = [
        f"Per adapted layer, one decode step (SmolLM2-135M shapes x {args.blocks} blocks, fp32, CPU, 1 thread, {mode}, "
        f"median of {args.rounds} alternating rounds), µs (+ over merged):",
        "",
        "| batch | merged | " + " | ".join(others) + " |",
        "|---|---:|" + "---:|" * len(others),
    ]
    for batch, result in results.items():
        us, extra = result["us_per_layer"], result["over_merged"]
        cells = [f"{us['merged']:.1f}"] + [f"{us[n]:.1f} ({extra[n]:+.1f})" for n in others]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        record = {"settings": vars(args) | {"out": None}, "torch": torch.__version__, "results": results, "table": text}
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
