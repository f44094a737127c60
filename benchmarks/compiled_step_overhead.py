"""Where a compiled decode step's time goes outside its kernels: dynamo's guards and the inputs it gathers per step.

Why: issue 24's compiled goal (GOAT / merged <= 1.10 at batch 1) is missed by the default path, and the layers' own
compiled chain (bench_decode_layers.py --compile) explains only part of the gap. Before each compiled step dynamo
checks its guards, which read every tensor the graph takes (its type, shape, strides, dimension markings; buffers'
aliasing as well), and the compiled function then fetches each of those tensors from its module; decoding, that runs
once per token, after the step before has streamed every weight through the caches. A merged layer gives the graph
one tensor (W0), a default GOAT layer six (W0, W_r, A, B and the frozen A0, B0), a prepared fp32 layer two
([W_res | s·B] and [W_r; A]). This profiles one compiled `generate` per variant and round (torch.profiler, whose
own cost is in every figure) and reports, per decoded token, the step's guard check ("TorchDynamo Cache Lookup"),
the bytecode before the graph ("Pregraph bytecode") and the compiled graph itself.

"goat, one tensor (probe)" is the default layer reading one packed copy of its five factors instead of the factors
(the same maths, decode.traced_adapter, on views of the copy; its greedy tokens are compared with the default's),
which also skips GoatLinear.forward's reads of its flags: what guards and gathering cost with one tensor and fewer
attributes a layer. It is a measurement, not a path: the copy is made once and would not follow a change of the
weights. "goat, no flag reads (probe)" skips the same reads but takes the six tensors as the default does, which
separates the two.

    python benchmarks/compiled_step_overhead.py --rounds 5 --out benchmarks/results/compiled_step_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from bench_decode import GOAT, build_variants, decode, processor_name, warmed_up_prompts
from torch.profiler import ProfilerActivity, profile

from goat_hf import GoatLinear
from goat_hf.decode import traced_adapter

EVENTS = {
    "guards": "TorchDynamo Cache Lookup",
    "pregraph": "Pregraph bytecode",
    "graph": "## Call CompiledFxGraph",
}
PROBE = "goat, one tensor (probe)"
FLAGLESS = "goat, no flag reads (probe)"


class OneTensorGoatLinear(GoatLinear):
    """The probe: under torch.compile, the adapter from views of one packed copy of W_r, A, A0, B and B0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(x)
        packed, offset, factors = self.packed_factors, 0, []
        for rows, cols in self.packed_shapes:
            factors.append(packed[offset : offset + rows * cols].view(rows, cols))
            offset += rows * cols
        router, A, A0, B, B0 = factors
        result = self.base_layer(x)
        tokens = x.reshape(-1, x.shape[-1])
        delta = traced_adapter(tokens, router, A, B, A0, B0, self.scaling, self.correction, self.top_k)
        return result + delta.view(result.shape)


class FlaglessGoatLinear(GoatLinear):
    """The second probe: under torch.compile, the default layer's traced forward without its flag reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return super().forward(x)
        return self._traced_forward(x, with_residual=True)


def as_probe_(model: torch.nn.Module, probe: type[GoatLinear]) -> torch.nn.Module:
    """Each default GOAT layer of `model` becomes `probe` (OneTensorGoatLinear gets its packed copy first)."""
    for layer in model.modules():
        if type(layer) is GoatLinear:
            if probe is OneTensorGoatLinear:
                factors = (layer.router.weight, layer.expert_A, layer.residual_A, layer.expert_B, layer.residual_B)
                layer.packed_shapes = [tuple(t.shape) for t in factors]
                packed = torch.cat([t.detach().flatten() for t in factors])
                layer.register_buffer("packed_factors", packed, persistent=False)
            layer.__class__ = probe
    return model


def profiled_decode(
    model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int
) -> tuple[dict[str, float], torch.Tensor]:
    """ms per decoded token of each event (all its occurrences: a GOAT model's step checks two frames' guards, the
    mask hook's and the model's) and of the step; the generated ids."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds, ids = decode(model, prompts, new_tokens)
    steps = new_tokens - 1  # the compiled calls: the prefill runs eagerly
    result = {"step": 1e3 * seconds}
    for key, name in EVENTS.items():
        durations = [e.cpu_time_total / 1e3 for e in prof.events() if e.name.startswith(name)]
        result[key] = sum(durations) / steps
    return result, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = argparse.Namespace(
        device="cpu", dtype="fp32", base="smollm2", threads=1, compile=True, cpp_wrapper=False, skip_guard_eval=False,
        prompt_tokens=32, new_tokens=args.new_tokens, variants=["merged", "goat", "goat prepared"],
    )  # fmt: skip
    models = build_variants(settings)
    default_settings = argparse.Namespace(**vars(settings) | {"variants": ["goat"]})
    models[PROBE] = as_probe_(build_variants(default_settings)["goat"], OneTensorGoatLinear)
    models[FLAGLESS] = as_probe_(build_variants(default_settings)["goat"], FlaglessGoatLinear)
    prompts = warmed_up_prompts(settings, models, 1)
    rows, tokens = {name: [] for name in models}, {}
    for _ in range(args.rounds):
        for name, model in models.items():
            row, tokens[name] = profiled_decode(model, prompts, args.new_tokens)
            rows[name].append(row)
    table = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rows.items()}
    lines = [
        f"SmolLM2-135M, fp32, CPU, 1 thread, torch.compile + static cache, batch 1, {args.new_tokens} new tokens, "
        f"under torch.profiler; medians of {args.rounds} rounds; ms per decoded token",
        "",
        "| variant | step | guards | pregraph | compiled graph |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in table.items():
        cells = " | ".join(f"{row[key]:.2f}" for key in ("step", "guards", "pregraph", "graph"))
        lines.append(f"| {name} | {cells} |")
    same = torch.equal(tokens[PROBE], tokens["goat"]) and torch.equal(tokens[FLAGLESS], tokens["goat"])
    lines.append(f"\ngreedy tokens of the probes = goat's: {same}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        record = {
            "settings": vars(args) | {"out": None},
            "machine": {"torch": torch.__version__, "processor": processor_name()},
            "goat": repr(GOAT),
            "probe_tokens_equal_goat": same,
            "per_token_ms": table,
            "rounds": rows,
        }
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
