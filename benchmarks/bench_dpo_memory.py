"""Peak memory of DPO training steps on SmolLM2-135M-Instruct: GOAT vs PEFT LoRA of the same total rank.

Why: TRL's DPOTrainer keeps no second model for a PEFT adapter (the reference is the adapter switched off); a model
it does not know as PEFT gets a full copy as its reference. GoatDPOTrainer takes the reference from the same model
(`disable_goat`, or a frozen copy of the adapter tensors for DPO after SFT), so its peak should stay within 1.15x of
LoRA's. The variants, each in a fresh subprocess, alternating which goes first, medians over the repeats:

- goat:        GoatDPOTrainer, GOAT injected by the trainer, reference = the base under disable_goat;
- goat-frozen: GoatDPOTrainer on a model that arrives with GOAT layers, reference = a frozen copy of the adapter;
- lora:        TRL's DPOTrainer with a LoraConfig (reference = the adapter switched off);
- goat-copy:   GoatDPOTrainer given a deep copy of the base as `ref_model`: what a second model would cost.

Each subprocess loads the model, records its resident memory (RSS), resets the peak (Linux clear_refs "5"), then
builds the trainer (injection, TRL's preparation) and runs `--steps` DPO steps (policy and reference forwards,
backward, AdamW). Reported: the peak over the loaded model and the whole peak (model included).
"""

from __future__ import annotations

import argparse
import copy
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
from bench_model import proc_status_kib

VARIANTS = ("goat", "goat-frozen", "lora", "goat-copy")
TARGET = 1.15  # GOAT / LoRA peak memory
RESULTS = Path(__file__).parent / "results"


def preference_pairs(count: int, prompt_words: int, answer_words: int) -> list[dict[str, str]]:
    """Fixed-length pairs (seeded), so every variant sees the same batches."""
    import random

    rng = random.Random(0)
    vocabulary = [
        "the",
        "of",
        "a",
        "day",
        "good",
        "bad",
        "news",
        "team",
        "game",
        "city",
        "people",
        "work",
        "time",
        "home",
        "great",
        "late",
        "early",
    ]

    def words(n: int) -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(n))

    return [
        {
            "prompt": words(prompt_words) + ":",
            "chosen": " " + words(answer_words),
            "rejected": " " + words(answer_words),
        }
        for _ in range(count)
    ]


def build_trainer(variant: str, model, tokenizer, dataset, args):
    from peft import LoraConfig
    from trl import DPOTrainer

    from goat_hf import GoatConfig, get_goat_model
    from goat_hf.dpo_trainer import GoatDPOTrainer

    goat = GoatConfig(r=args.rank, num_experts=8, top_k=2, target_modules="all-linear")
    kwargs = dict(args=args.dpo_config, train_dataset=dataset, processing_class=tokenizer)
    if variant == "lora":
        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear")
        return DPOTrainer(model, peft_config=lora, **kwargs)
    if variant == "goat-copy":
        return GoatDPOTrainer(model, copy.deepcopy(model), goat_config=goat, **kwargs)
    if variant == "goat-frozen":
        get_goat_model(model, goat)
    return GoatDPOTrainer(model, goat_config=goat, **kwargs)


def measure(args: argparse.Namespace, variant: str) -> dict:
    """In a fresh subprocess: the resident peak of building the trainer and `--steps` DPO steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from goat_hf.tasks.assets import smollm2_path

    torch.set_num_threads(args.threads)
    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():  # transformers maps the file lazily: touch every weight before measuring
        for param in model.parameters():
            param.sum()
    from datasets import Dataset

    dataset = Dataset.from_list(preference_pairs(args.batch * args.steps, args.prompt_words, args.answer_words))
    args.dpo_config = DPOConfig(
        output_dir=str(Path(args.tmp) / variant), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
        max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-5, logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0, gradient_checkpointing=args.checkpointing,
    )  # fmt: skip
    gc.collect()
    base = 1024 * proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    trainer = build_trainer(variant, model, tokenizer, dataset, args)
    init_s = time.perf_counter() - start
    start = time.perf_counter()
    trainer.train()
    steps_s = time.perf_counter() - start
    peak = 1024 * proc_status_kib("VmHWM")
    margins = [entry["rewards/margins"] for entry in trainer.state.log_history if "rewards/margins" in entry]
    return {
        "model_mib": base / 2**20,
        "peak_mib": peak / 2**20,
        "over_model_mib": (peak - base) / 2**20,
        "init_s": init_s,
        "step_s": steps_s / args.steps,
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "first_margin": margins[0] if margins else None,
    }


def in_subprocess(args: argparse.Namespace, variant: str) -> dict:
    command = [sys.executable, __file__, "--measure", variant, "--tmp", args.tmp]
    for key in ("rank", "batch", "steps", "threads", "prompt_words", "answer_words"):
        command += [f"--{key}", str(getattr(args, key))]
    command += ["--checkpointing"] if args.checkpointing else []
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}  # RSS follows the live tensors
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_all(args: argparse.Namespace) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % len(VARIANTS) :] + VARIANTS[: repeat % len(VARIANTS)]  # rotate who goes first
        for variant in order:
            result = in_subprocess(args, variant)
            runs[variant].append(result)
            print(f"repeat {repeat} {variant}: {json.dumps(result)}", flush=True)
    return runs


def report(args: argparse.Namespace, medians: dict[str, dict]) -> None:
    lora = medians["lora"]
    print(
        f"\nSmolLM2-135M-Instruct fp32, CPU ({args.threads} thread), DPO (sigmoid, beta 0.1), batch {args.batch} "
        f"pairs, prompts of {args.prompt_words} words and answers of {args.answer_words}, {args.steps} AdamW steps, "
        f"total rank {args.rank} (GOAT E=8, k=2), activation checkpointing {'on' if args.checkpointing else 'off'}; "
        f"resident memory, medians of {args.repeats} runs per variant, alternating\n"
    )
    print("| variant | reference | peak (MiB) | peak over the loaded model (MiB) | peak / LoRA's | s per step |")
    print("|---|---|---:|---:|---:|---:|")
    references = {
        "goat": "base (disable_goat)",
        "goat-frozen": "frozen adapter copy",
        "lora": "adapter off (TRL)",
        "goat-copy": "deep copy of the base",
    }
    for variant in VARIANTS:
        row = medians[variant]
        print(
            f"| {variant} | {references[variant]} | {row['peak_mib']:.0f} | {row['over_model_mib']:.0f} | "
            f"{row['peak_mib'] / lora['peak_mib']:.3f}x | {row['step_s']:.1f} |"
        )
    ratio = medians["goat"]["peak_mib"] / lora["peak_mib"]
    print(f"\nGOAT / LoRA peak: {ratio:.3f}x (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="/tmp/bench_dpo_memory")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt_words", type=int, default=48)
    parser.add_argument("--answer_words", type=int, default=16)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (TRL's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--out", type=Path, default=RESULTS / "dpo_memory.json")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args, args.measure)))
        return
    runs = run_all(args)
    medians = {
        variant: {key: statistics.median(run[key] for run in results) for key in results[0] if key != "first_margin"}
        for variant, results in runs.items()
    }
    report(args, medians)
    ratios = {variant: medians[variant]["peak_mib"] / medians["lora"]["peak_mib"] for variant in VARIANTS}
    settings = {key: value for key, value in vars(args).items() if key not in ("measure", "out", "tmp")}
    record = {
        "settings": settings,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "target_peak_ratio": TARGET,
        "peak_ratio_over_lora": ratios,
        "target_met": ratios["goat"] <= TARGET,
        "medians": medians,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
