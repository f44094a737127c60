"""Decoding speed: GOAT vs PEFT LoRA (unmerged) vs the merged base, SmolLM2-135M-Instruct, greedy `generate`.

Why: issue 24. A GOAT adapter can never be merged away (its routing is per token), so what one generated token costs
is paid on every token a trained adapter ever serves. "merged" is the base alone: a merged LoRA costs exactly that.
"goat" is the default inference path (eval, no_grad: goat_hf/decode.py), "goat prepared" the same adapter after
`goat_hf.prepare_for_inference` (residual folded into W0 in place). Eager on the CPU both decode through goat_hf's C++
kernel (goat_hf/cpu_kernel.py); "goat prepared, no CPU kernel" is the prepared model without it (ATen ops). Compiled,
none calls the kernel: a prepared layer is inductor's kernel, then one matmul with [W_res | s·B], and "goat prepared,
addmm" adds the up-projection after W0's matmul instead, as before [W_res | s·B]. Each of the two is an A/B of one
change. GOAT: E = 8, top-2, r = 8 on every Linear but the head; LoRA: PEFT r = 8 on exactly the same modules. KV
cache, greedy, `min_new_tokens` = `max_new_tokens` so every variant decodes the same count. The time per token is
taken between the first and the last call of a logits processor (decode steps only, the prefill left out). Variants
alternate within each round; each figure is a median over rounds and each ratio the median of per-round ratios.

    python benchmarks/bench_decode.py --out benchmarks/results/bench_decode_cpu.json            # eager, 1 thread
    python benchmarks/bench_decode.py --compile --out benchmarks/results/bench_decode_cpu_compiled.json
    python benchmarks/bench_decode.py --device cuda --dtype bf16 --base random --out ...          # device_check.sh
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch
from bench_model import DTYPES, load_base, lora_model
from pairing import paired_ratio, ratio_interval
from torch import nn
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList

from goat_hf import GoatConfig, get_goat_model, goat_layers, prepare_for_inference
from goat_hf.model import find_target_linears

GOAT = GoatConfig(r=8, num_experts=8, top_k=2, target_modules="all-linear", seed=1)
ISOLATED_COMPILES = "isolate_recompiles" in inspect.signature(torch.compile).parameters  # where torch has it
VARIANTS = ("merged", "lora", "goat", "goat prepared", "goat prepared, addmm", "goat prepared, no CPU kernel")
GOALS = {  # (numerator, denominator, batch, eager bound, compiled bound): issue 24
    "GOAT / LoRA unmerged": ("goat", "lora", None, 1.0, None),
    "GOAT / merged, batch 1": ("goat", "merged", 1, 1.20, 1.10),
    "GOAT / merged, batch 8": ("goat", "merged", 8, 1.10, None),
}


class StepClock(LogitsProcessor):
    """Called once per generated token: its call times give the decode steps' durations."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def processor_name() -> str:
    """The CPU's model name (platform.processor() is empty on Linux): the ratios differ from one CPU to another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor()


def build_variants(args: argparse.Namespace) -> dict[str, nn.Module]:
    models = {}
    for name in args.variants:
        model = load_base(args).eval()
        if name.startswith("goat"):
            get_goat_model(model, GOAT)
            if name.startswith("goat prepared"):
                prepare_for_inference(model, cpu_kernel=name == "goat prepared")
            if name == "goat prepared, addmm":
                for layer in goat_layers(model).values():
                    layer.prepared.extended_weight = None  # the compiled step then adds g ⊙ low times s·B after W0 x
        elif name == "lora":
            targets = find_target_linears(model, GOAT, heads=[])
            model = lora_model(
                model, [name for name in targets if min(targets[name].weight.shape) >= GOAT.r], r=8
            ).eval()
        model.requires_grad_(False)
        if args.compile:
            model.generation_config.cache_implementation = "static"
            # fullgraph: a graph break fails the run. cpp_wrapper: inductor's default Python wrapper makes one Python
            # call per kernel, the per-op overhead that decoding on a CPU is made of (on CUDA, CUDA graphs remove it)
            options = {"cpp_wrapper": True} if args.device == "cpu" and args.cpp_wrapper else None
            compile_config = CompileConfig(fullgraph=True, mode=None if options else "reduce-overhead", options=options)
            compile_config._compile_all_devices = True  # generate compiles on CUDA only, unless told (a class flag)
            model.generation_config.compile_config = compile_config
            if ISOLATED_COMPILES:
                # the compiled entries of this variant alone, as a served model has them: the variants' steps share
                # one code object, and each step would first check (and fail) the guards of the variant before it.
                # Set on the transformers model whose generate runs (inside PEFT's wrapper for LoRA), which reuses it
                # while its compile config is equal to this one.
                target = model.get_base_model() if hasattr(model, "get_base_model") else model
                compiled = torch.compile(target.__call__, **compile_config.to_dict(), isolate_recompiles=True)
                target._compiled_call, target._last_compile_config = compiled, compile_config
        models[name] = model
    return models


def greedy_ids(model: nn.Module, prompts: torch.Tensor, new_tokens: int, clock: LogitsProcessor) -> torch.Tensor:
    """Exactly `new_tokens` greedy tokens per prompt (the ids after the prompt), `clock` called once per token."""
    with torch.no_grad():
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=0,
        )
    return out[:, prompts.shape[1] :]


def decode(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds per decoded token (prefill excluded) and the generated ids."""
    clock = StepClock(prompts.device)
    ids = greedy_ids(model, prompts, new_tokens, clock)
    return (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1), ids


def warmed_up_prompts(args: argparse.Namespace, models: dict[str, nn.Module], batch: int) -> torch.Tensor:
    """The batch's random prompts, after one decode of each variant in turn (with --compile, its compilation; with
    --skip-guard-eval, dynamo then stops checking guards, which it allows only once every graph is compiled)."""
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(100, 40000, (batch, args.prompt_tokens), generator=generator).to(args.device)
    for model in models.values():
        decode(model, prompts, args.new_tokens)
    if args.skip_guard_eval:
        torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    return prompts


def summary(seconds: dict[str, list[float]], tokens: dict[str, torch.Tensor]) -> dict:
    same = {f"{name} = goat": torch.equal(tokens[name], tokens["goat"]) for name in tokens if name.startswith("goat ")}
    return {
        "ms_per_token": {name: 1e3 * statistics.median(s) for name, s in seconds.items()},
        "seconds_per_token": seconds,
        "same_greedy_tokens": same,
    }


def time_batch(args: argparse.Namespace, models: dict[str, nn.Module], batch: int) -> dict:
    prompts = warmed_up_prompts(args, models, batch)
    seconds, tokens = {name: [] for name in models}, {}
    for _ in range(args.repeats):
        for name, model in models.items():
            per_token, tokens[name] = decode(model, prompts, args.new_tokens)
            seconds[name].append(per_token)
    return summary(seconds, tokens)


class Turns:
    """Hands the CPU to one variant's `generate` at a time, in rotation, one decode step each (--interleave steps):
    step i of each variant then runs right after step i of the one before, so that a pair of steps meets the same
    state of a shared, noisy machine. Each variant runs in a thread of its own; all but one wait."""

    def __init__(self, names: list[str]) -> None:
        self.active, self.current, self.condition = list(names), 0, threading.Condition()

    def wait(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.active[self.current] == name)

    def pass_on(self, name: str) -> None:
        with self.condition:
            self.current = (self.active.index(name) + 1) % len(self.active)
            self.condition.notify_all()

    def leave(self, name: str) -> None:
        """Out of the rotation (done, or failed): the turn goes on if it was `name`'s, and stays where it is if not."""
        with self.condition:
            index = self.active.index(name)
            self.active.remove(name)
            if index < self.current:
                self.current -= 1
            elif self.active:
                self.current %= len(self.active)
            self.condition.notify_all()


class TurnClock(LogitsProcessor):
    """A StepClock that passes the turn on at each call: each step is timed from getting the turn back to the next
    call (the sampling and bookkeeping of one token and the forward of the next), never while another one runs."""

    def __init__(self, name: str, turns: Turns, device: torch.device) -> None:
        self.name, self.turns, self.device, self.started, self.steps = name, turns, device, None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the step's kernels done before its end is taken, and before the next one runs
        now = time.perf_counter()
        if self.started is not None:
            self.steps.append(now - self.started)
        self.turns.pass_on(self.name)
        self.turns.wait(self.name)
        self.started = time.perf_counter()
        return scores


def interleaved_round(args: argparse.Namespace, models: dict[str, nn.Module], prompts: torch.Tensor) -> dict:
    """One round of --interleave steps: every variant's generate at once, taking turns step by step; per variant the
    seconds of each decode step and the generated ids."""
    names = list(models)
    turns, clocks, outputs, errors = Turns(names), {}, {}, []

    def run(name: str) -> None:
        try:  # whatever fails, the finally hands the turn on: the other threads must not wait for this one forever
            torch.set_num_threads(args.threads)  # per thread: OpenMP's thread count is a per-thread setting
            turns.wait(name)
            clocks[name] = TurnClock(name, turns, prompts.device)
            outputs[name] = greedy_ids(models[name], prompts, args.new_tokens, clocks[name])
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)
        finally:
            turns.leave(name)

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {name: (clocks[name].steps, outputs[name]) for name in names}


def time_batch_steps(args: argparse.Namespace, models: dict[str, nn.Module], batch: int) -> dict:
    """time_batch with --interleave steps: each round's variants decode together, one step each in turn (Turns); the
    order rotates from round to round. Ratios are medians of per-step ratios."""
    prompts = warmed_up_prompts(args, models, batch)  # one variant at a time
    names = list(models)
    seconds, tokens, lengths = {name: [] for name in names}, {}, []
    for round_index in range(args.repeats):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        steps = interleaved_round(args, {name: models[name] for name in order}, prompts)
        for name in names:
            seconds[name] += steps[name][0]
            tokens[name] = steps[name][1]
        counts = {len(steps[name][0]) for name in names}
        assert len(counts) == 1, f"the variants decoded different numbers of steps in round {round_index}: {counts}"
        lengths.append(counts.pop())
    return summary(seconds, tokens) | {"steps_per_round": lengths}


def ratio(result: dict, num: str, den: str) -> float | None:
    times = result["seconds_per_token"]
    return paired_ratio(times, num, den) if num in times and den in times else None


def report(args: argparse.Namespace, results: dict[int, dict]) -> str:
    names = list(results[args.batch_sizes[0]]["ms_per_token"])
    wrapper = "C++ wrapper" if args.cpp_wrapper else "Python wrapper"
    compiled = wrapper if args.device == "cpu" else "reduce-overhead"  # the options build_variants gives
    mode = f"torch.compile ({compiled}) + static cache" if args.compile else "eager"
    if args.compile and args.skip_guard_eval:
        mode += ", guards not evaluated (skip_guard_eval_unsafe)"
    lines = [
        f"SmolLM2-135M-Instruct ({args.base} weights), {args.dtype}, {args.device} ({torch.get_num_threads()} "
        f"thread(s)), {mode}; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, KV cache; "
        + (
            f"{args.repeats} rounds of all variants decoding in turns, one step each (ratios: median of per-step "
            "ratios)"
            if args.interleave == "steps"
            else f"median of {args.repeats} alternating rounds (ratios: median of per-round ratios)"
        ),
        "",
        "| batch | " + " | ".join(f"{n} (ms/token)" for n in names) + " | GOAT / merged | GOAT / LoRA unmerged "
        "| prepared / merged |",
        "|---|" + "---:|" * (len(names) + 3),
    ]
    for batch, result in results.items():
        ms = result["ms_per_token"]
        cells = [f"{ms[n]:.1f}" for n in names]
        ratios = [
            ratio(result, "goat", "merged"),
            ratio(result, "goat", "lora"),
            ratio(result, "goat prepared", "merged"),
        ]
        cells += ["n/a" if value is None else f"{value:.3f}" for value in ratios]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    lines.append("")
    for goal, (num, den, batch, eager, compiled) in GOALS.items():
        bound = compiled if args.compile else eager
        for b in [batch] if batch is not None else args.batch_sizes:
            if bound is None or b not in results:
                continue
            for variant in (num, f"{num} prepared"):
                value = ratio(results[b], variant, den)
                if value is not None:
                    low, high = ratio_interval(results[b], variant, den)
                    verdict = goal_verdict(value, low, high, bound)
                    name = goal.split(", batch")[0].replace("GOAT", variant)
                    lines.append(
                        f"- {name} at batch {b}: {value:.3f} (95 % interval {low:.3f}-{high:.3f}; goal <= {bound}): "
                        f"{verdict}"
                    )
    for batch, result in results.items():
        lines += ab_lines(args, batch, result)
        for check, same in result["same_greedy_tokens"].items():
            lines.append(f"- batch {batch}: greedy tokens {check}: {same}")
    return "\n".join(lines)


def goal_verdict(value: float, low: float, high: float, bound: float) -> str:
    """Met or not by the median, and whether the interval settles it (this host's noise is of the goals' size)."""
    if high <= bound or low > bound:
        return "met" if value <= bound else "**not met**"
    return f"{'met' if value <= bound else '**not met**'} by the median; the interval spans {bound}"


def ab_lines(args: argparse.Namespace, batch: int, result: dict) -> list[str]:
    """The A/B variants against "goat prepared": without the CPU kernel (eager), with the up-projection after W0's
    matmul (compiled)."""
    lines = []
    for other in ("goat prepared, no CPU kernel", "goat prepared, addmm"):
        ab = ratio(result, "goat prepared", other)
        if ab is not None:
            lines.append(f"- batch {batch}: goat prepared / {other}: {ab:.3f}")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--base", choices=("smollm2", "random"), default="smollm2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:4]))
    parser.add_argument(
        "--interleave",
        choices=("rounds", "steps"),
        default="rounds",
        help="rounds: each variant's generate in turn, timed as a whole; steps: all variants' generate at once, "
        "taking turns one decode step each, every step timed (a pair of steps one step apart)",
    )
    parser.add_argument("--compile", action="store_true", help="static KV cache and torch.compile of the decode step")
    parser.add_argument(
        "--python-wrapper",
        dest="cpp_wrapper",
        action="store_false",
        help="with --compile on CPU: inductor's default Python wrapper (g++ -O3 of the C++ wrapper of a whole GOAT "
        "decode graph ran over 40 min on a 2-core machine)",
    )
    parser.add_argument(
        "--skip-guard-eval",
        action="store_true",
        help="with --compile: torch.compiler.set_stance(skip_guard_eval_unsafe=True) after the warm-up, as a server "
        "whose weights and inputs never change shape may set (dynamo then checks no guards before a step)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.skip_guard_eval and (not args.compile or len(args.batch_sizes) > 1):
        parser.error(
            "--skip-guard-eval needs --compile and one batch size: with guards off, dynamo would run the "
            "first batch size's graph for the next (it cannot tell them apart)"
        )
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    models = build_variants(args)
    timer = time_batch_steps if args.interleave == "steps" else time_batch
    results = {batch: timer(args, models, batch) for batch in args.batch_sizes}
    if args.compile:
        graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    text = report(args, results)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "settings": {key: value for key, value in vars(args).items() if key != "out"},
            "machine": {"torch": torch.__version__, "processor": processor_name(), "threads": args.threads},
            "isolated_compiles": ISOLATED_COMPILES if args.compile else None,
            "results": {str(batch): result for batch, result in results.items()},
            "graph_breaks": graph_breaks if args.compile else None,
            "table": text,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
