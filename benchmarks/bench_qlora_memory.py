"""Peak memory of a training step over a 4-bit SmolLM2 (QLoRA-style): GOAT vs PEFT LoRA over the same base.

Why: a 4-bit base is how people fit a big model on one GPU, so what GOAT adds on top of it is what decides
whether it fits where QLoRA fits. The base is SmolLM2-135M-Instruct loaded with BitsAndBytesConfig (NF4,
double quantisation); GOAT (E=8, k=2, balance loss as GoatTrainer adds it) and PEFT LoRA (no
prepare_model_for_kbit_training, so both see the same base) adapt the same 210 Linears with the same total
rank, r=8 and r=32; adapters are fp32 in both. One fresh subprocess per variant and repeat loads the base, then
measures injection plus the training steps (forward with labels, backward, AdamW step), and times the injection:
for GOAT the SVD init over the 4-bit base (dequantize each layer to fp32, one at a time, then its SVD). The
variants alternate (GOAT first in even repeats, LoRA first in odd ones) so that a drift in the machine's state
hits both; the table reports medians over the repeats and `--out` writes every run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_model import make_batch, make_step, proc_status_kib, synchronize
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from goat_hf import GoatConfig, get_goat_model, goat_layers
from goat_hf.base_weights import dense_weight
from goat_hf.tasks.assets import smollm2_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANKS = (8, 32)
TARGET = 1.15  # GOAT / LoRA peak memory


def load_4bit_base(args: argparse.Namespace) -> nn.Module:
    """SmolLM2 in NF4 with double quantisation, computing in --dtype, every weight paged in."""
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[args.dtype],
    )
    device_map = {"": args.device}
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path(), quantization_config=config, dtype=DTYPES[args.dtype], device_map=device_map
    )
    with torch.no_grad():  # transformers maps the file lazily: touch every weight before measuring
        for param in model.parameters():
            param.sum()
    return model.train()


def adapt(model: nn.Module, variant: str) -> nn.Module:
    """'goat-r8', 'lora-r32', ...: GOAT (E=8, k=2) or PEFT LoRA (alpha = 2r, no dropout) of that total rank."""
    method, rank = variant.split("-r")
    if method == "goat":
        return get_goat_model(model, GoatConfig(r=int(rank), num_experts=8, top_k=2, target_modules="all-linear"))
    config = LoraConfig(r=int(rank), lora_alpha=2 * int(rank), lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, config)


def adapted_names(model: nn.Module) -> set[str]:
    goat = set(goat_layers(model))
    lora = {name.removeprefix("base_model.model.") for name, m in model.named_modules() if hasattr(m, "lora_A")}
    return goat | lora


def peak_bytes(cuda: bool) -> int:
    return torch.cuda.max_memory_allocated() if cuda else 1024 * proc_status_kib("VmHWM")


def measure(args: argparse.Namespace, variant: str) -> dict:
    """In a fresh subprocess: memory of injecting into the loaded 4-bit base, then of `--steps` training steps.

    CPU: resident memory, the peak (VmHWM) reset to the current RSS after loading (Linux clear_refs "5"), with
    glibc's mmap threshold pinned by the caller so RSS follows the live tensors. CUDA: allocated memory.
    """
    model = load_4bit_base(args)
    dequantize_s = dequantize_seconds(model)
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = 1024 * proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    model = adapt(model, variant)
    synchronize(args)
    init_s = time.perf_counter() - start
    init_peak = peak_bytes(cuda)
    step = make_step(model, make_batch(args))
    for _ in range(args.steps):
        step()
    synchronize(args)
    peak = peak_bytes(cuda)
    return {
        "base_mib": base / 2**20,
        "peak_mib": peak / 2**20,
        "over_base_mib": (peak - base) / 2**20,
        "init_over_base_mib": (init_peak - base) / 2**20,
        "init_s": init_s,
        "dequantize_s": dequantize_s,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "adapted": sorted(adapted_names(model)),
    }


def in_subprocess(args: argparse.Namespace, variant: str) -> dict:
    command = [sys.executable, __file__, "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch)]
    command += ["--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
    command += ["--measure", variant]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def dequantize_seconds(model: nn.Module) -> float:
    """Wall time of reading every 4-bit layer's dense fp32 W0 alone (the part of GOAT's init the SVD is not)."""
    start = time.perf_counter()
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            dense_weight(module)
    return time.perf_counter() - start


def medians(runs: list[dict]) -> dict:
    """Per key, the median over the repeats of one variant (the adapted names are the same in every run)."""
    numbers = {key: statistics.median(run[key] for run in runs) for key, value in runs[0].items() if key != "adapted"}
    return numbers | {"adapted": runs[0]["adapted"]}


def run_all(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every variant `--repeats` times, each in its own subprocess, GOAT and LoRA alternating which goes first."""
    runs: dict[str, list[dict]] = {f"{method}-r{rank}": [] for rank in args.ranks for method in ("goat", "lora")}
    for repeat in range(args.repeats):
        for rank in args.ranks:
            methods = ("goat", "lora") if repeat % 2 == 0 else ("lora", "goat")
            for method in methods:
                variant = f"{method}-r{rank}"
                result = in_subprocess(args, variant)
                runs[variant].append(result)
                shown = {k: v for k, v in result.items() if k != "adapted"}
                print(f"repeat {repeat} {variant}: {json.dumps(shown)}", flush=True)
            if runs[f"goat-r{rank}"][-1]["adapted"] != runs[f"lora-r{rank}"][-1]["adapted"]:
                raise RuntimeError("GOAT and PEFT adapted different modules; the comparison would not be fair.")
    return runs


def report(args: argparse.Namespace, results: dict[str, dict]) -> None:
    cuda = args.device.startswith("cuda")
    kind = "max_memory_allocated" if cuda else "resident (RSS), glibc mmap threshold 64 KiB"
    print(
        f"\nSmolLM2-135M-Instruct in NF4 (double quantisation), {args.dtype} compute and non-quantized weights, "
        f"{args.device} ({args.threads} threads); batch {args.batch} x {args.seq} tokens, {args.steps} AdamW steps; "
        f"{len(results[f'goat-r{args.ranks[0]}']['adapted'])} adapted Linears; memory: {kind}; "
        f"medians of {args.repeats} runs per variant, alternating\n"
    )
    print("| total rank | measure | GOAT (E=8, k=2) | PEFT LoRA | GOAT/LoRA | target |")
    print("|---|---|---:|---:|---:|---|")
    for rank in args.ranks:
        goat, lora = results[f"goat-r{rank}"], results[f"lora-r{rank}"]
        for key, measure in (
            ("peak_mib", "peak memory, 4-bit base included (MiB)"),
            ("over_base_mib", "peak memory over the loaded base (MiB)"),
            ("init_over_base_mib", "peak of injection alone, over the base (MiB)"),
            ("trainable", "trainable parameters"),
        ):
            ratio = goat[key] / lora[key]
            target = "" if key != "peak_mib" else f"<= {TARGET:.2f}x: " + ("met" if ratio <= TARGET else "**not met**")
            fmt = ",.0f" if key == "trainable" else ".0f"
            print(f"| r={rank} | {measure} | {goat[key]:{fmt}} | {lora[key]:{fmt}} | {ratio:.3f}x | {target} |")
    first = results[f"goat-r{args.ranks[0]}"]
    print(f"\nThe loaded 4-bit base: {first['base_mib']:.0f} MiB resident before adapting.")
    print(f"Init over the 4-bit base (dequantizing all layers alone: {first['dequantize_s']:.2f} s):")
    for rank in args.ranks:
        goat_s, lora_s = results[f"goat-r{rank}"]["init_s"], results[f"lora-r{rank}"]["init_s"]
        print(f"- r={rank}: get_goat_model {goat_s:.1f} s (SVD init), get_peft_model {lora_s:.2f} s")


def write_json(args: argparse.Namespace, runs: dict[str, list[dict]], results: dict[str, dict]) -> None:
    """Every run, the medians and the ratios, with the settings and the machine, to `--out`."""
    settings = {key: value for key, value in vars(args).items() if key not in ("measure", "out")}
    ratios = {
        f"r{rank}": results[f"goat-r{rank}"]["peak_mib"] / results[f"lora-r{rank}"]["peak_mib"] for rank in args.ranks
    }
    record = {
        "settings": settings,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "note": args.note,
        "target_peak_ratio": TARGET,
        "peak_ratio_goat_over_lora": ratios,
        "target_met": all(ratio <= TARGET for ratio in ratios.values()),
        "medians": {
            variant: {k: v for k, v in result.items() if k != "adapted"} for variant, result in results.items()
        },
        "adapted": results[f"goat-r{args.ranks[0]}"]["adapted"],
        "runs": {
            variant: [{k: v for k, v in run.items() if k != "adapted"} for run in rs] for variant, rs in runs.items()
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="compute dtype (adapters stay fp32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="training steps measured per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS), help="total ranks compared")
    parser.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per variant (medians reported)")
    parser.add_argument("--out", help="write every run, the medians and the ratios to this JSON file")
    parser.add_argument("--note", default="", help="free text stored in --out (e.g. what else ran on the machine)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the subprocess of one variant
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.measure:
        print(json.dumps(measure(args, args.measure)))
        return
    runs = run_all(args)
    results = {variant: medians(variant_runs) for variant, variant_runs in runs.items()}
    report(args, results)
    if args.out:
        write_json(args, runs, results)


if __name__ == "__main__":
    main()
