"""SmolLM2-135M training step, peak memory, SVD-init and adapter-load time: GOAT vs PEFT LoRA of the same rank.

Why: DESIGN §2 says the fused layer costs what a rank-r LoRA costs; this checks it where it matters, a full
training step (forward, backward, AdamW step) of a real model, and checks that an adapter reloads fast (no
SVD on load, DESIGN §4). GOAT: GoatConfig(r=32, num_experts=8, top_k=2, target_modules="all-linear") and its
balance loss (aux_loss_coef * sum over layers, as GoatTrainer adds it); LoRA: PEFT r=32 on exactly the same
module names. Step times come from one process with both models, interleaved; peak memory from one fresh
subprocess per variant.
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
from patched_layers import PATCHES
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from goat_hf import GoatConfig, get_goat_model, goat_layers, load_goat_adapter, save_goat_adapter
from goat_hf.tasks.assets import smollm2_path

GOAT_CONFIG = GoatConfig(r=32, num_experts=8, top_k=2, target_modules="all-linear")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PATCHED = [f"goat_{name}" for name in PATCHES]  # --patched: the proposed changes of patched_layers.py


def patch_layers(model: nn.Module, variant: str) -> nn.Module:
    """Apply the proposed change `variant` (patched_layers.PATCHES) to every GOAT layer of `model`."""
    for layer in goat_layers(model).values():
        PATCHES[variant.removeprefix("goat_")](layer)
    return model


def load_base(args: argparse.Namespace) -> nn.Module:
    """The base, every weight paged in: transformers maps the file lazily, and the first code to touch a weight
    (GOAT's SVD, anyone's first forward) would otherwise be charged for reading it."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=DTYPES[args.dtype]).to(args.device).train()
    with torch.no_grad():
        for param in model.parameters():
            param.sum()
    return model


def lora_model(base: nn.Module, target_names: list[str]) -> nn.Module:
    """PEFT LoRA on the module names GOAT adapted (suffixes), checked to be exactly the same set."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in target_names})
    config = LoraConfig(r=GOAT_CONFIG.r, lora_alpha=2 * GOAT_CONFIG.r, lora_dropout=0.0, target_modules=suffixes)
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

    def step() -> None:
        loss = model(**batch).loss
        if layers:
            loss = loss + GOAT_CONFIG.aux_loss_coef * sum(layer.routing.balance_loss for layer in layers)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


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
    """Runs in a fresh subprocess: peak memory of adapting the loaded base and 5 training steps, over the base.

    CPU: the resident peak (VmHWM) is reset to the current RSS after loading the base (Linux clear_refs "5"),
    so the delta covers adapter weights and buffers, gradients, AdamW state, activations and allocator
    slack, and not the loader's transient peak. CUDA: torch.cuda.max_memory_allocated over the same span.
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
    if variant == "lora":
        model = lora_model(model, args.targets)
    else:
        model = get_goat_model(model, GOAT_CONFIG)
        model = patch_layers(model, variant) if variant != "goat" else model
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
    command += ["--seq", str(args.seq), "--threads", str(torch.get_num_threads())]
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


def print_report(args: argparse.Namespace, times: dict[str, list[float]], extra: dict[str, float]) -> None:
    extra |= {f"{name}_step_s": statistics.median(seconds) for name, seconds in times.items()}

    def row(
        measure: str, key: str, fmt: str, target: float | None = None, variant: str = "goat", note: str = ""
    ) -> None:
        goat, lora = extra[f"{variant}_{key}"], extra[f"lora_{key}"]
        pairs = zip(times[variant], times["lora"], strict=True)
        ratio = statistics.median(g / lo for g, lo in pairs) if key == "step_s" else goat / lora
        note = note or ("" if target is None else verdict(ratio <= target, f"<= {target:.2f}x"))
        print(f"| {measure} | {goat:{fmt}} | {lora:{fmt}} | {ratio:.3f}x | {note} |")

    print(
        f"\nSmolLM2-135M-Instruct, {args.dtype} base, {args.device} ({torch.get_num_threads()} threads), batch "
        f"{args.batch} x {args.seq} tokens, AdamW; {extra['targets']:.0f} adapted Linears; r=32 (GOAT: E=8, k=2, "
        f"d=4); step = median of {args.repeats} interleaved steps, ratio = median of per-pair ratios\n"
    )
    print("| measure | GOAT | PEFT LoRA | GOAT/LoRA | target |")
    print("|---|---:|---:|---:|---|")
    memory = "max_memory_allocated" if args.device.startswith("cuda") else "live tensors"
    row("training step (s)", "step_s", ".3f", 1.10)
    row(f"peak memory over the base, {memory} (MiB)", "peak_mib", ".0f", 1.10)
    if not args.device.startswith("cuda"):
        row("peak RSS over the base, glibc default heap (MiB)", "heap_peak_mib", ".0f")
    for variant in PATCHED if args.patched else ():
        row(f"training step, {variant} patch (s)", "step_s", ".3f", 1.10, variant)
        row(f"peak memory, {variant} patch, {memory} (MiB)", "peak_mib", ".0f", 1.10, variant)
    row(
        "trainable parameters",
        "trainable",
        ",.0f",
        note=f"GOAT adds {extra['goat_residual_buffers']:,.0f} frozen factors",
    )
    row("init: get_goat_model / get_peft_model (s)", "init_s", ".2f")
    row(
        "adapter load onto a loaded base (s)", "load_s", ".3f", note=verdict(extra["goat_load_s"] <= 1.0, "GOAT <= 1 s")
    )
    row("adapter folder (MiB)", "file_mib", ".1f")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="base weights (adapters stay fp32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8, help="interleaved timed steps per variant")
    parser.add_argument("--load-tries", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--patched", action="store_true", help="also the proposed forwards (patched_layers.py)")
    parser.add_argument("--profile", action="store_true", help="also print the top ops of one step of each")
    parser.add_argument("--memory-of", choices=["goat", "lora", *PATCHED], help=argparse.SUPPRESS)  # subprocess
    parser.add_argument("--targets", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.memory_of:
        print(json.dumps(measure_memory(args, args.memory_of)))
        return
    base = load_base(args)
    start = time.perf_counter()
    goat = get_goat_model(base, GOAT_CONFIG)
    extra = {"goat_init_s": time.perf_counter() - start}
    targets = list(goat_layers(goat))
    print(f"all-linear targets {len(targets)} Linears: {sorted({t.rsplit('.', 1)[-1] for t in targets})}", flush=True)
    base = load_base(args)
    start = time.perf_counter()
    lora = lora_model(base, targets)
    extra["lora_init_s"] = time.perf_counter() - start
    batch = make_batch(args)
    steps = {"goat": make_step(goat, batch), "lora": make_step(lora, batch)}
    for variant in PATCHED if args.patched else ():
        with tempfile.TemporaryDirectory() as folder:  # the same adapter on a fresh base, no second SVD
            save_goat_adapter(goat, folder)
            steps[variant] = make_step(patch_layers(load_goat_adapter(load_base(args), folder), variant), batch)
    times = time_steps(steps, args.repeats, args)
    print("steps timed", flush=True)
    if args.profile:
        for name in steps:
            profile_step(steps[name], name)
    extra |= time_loads(args, goat, lora, args.load_tries)
    del goat, lora, steps
    gc.collect()
    for variant in ["goat", "lora", *(PATCHED if args.patched else ())]:
        extra |= {f"{variant}_{k}": v for k, v in memory_in_subprocess(args, variant, targets, pinned=True).items()}
        if variant in ("goat", "lora") and not args.device.startswith("cuda"):
            heap = memory_in_subprocess(args, variant, targets, pinned=False)
            extra[f"{variant}_heap_peak_mib"] = heap["peak_mib"]
    extra["targets"] = len(targets)
    print_report(args, times, extra)


def profile_step(step: Callable[[], None], name: str) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n#### {name}: top ops of one training step by self CPU time\n```")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), "\n```", flush=True)


if __name__ == "__main__":
    main()
