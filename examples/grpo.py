"""GRPO with GOAT on SmolLM2-135M-Instruct, offline: sft_nlg.py's arithmetic word problems, exact-answer reward.

GoatGRPOTrainer is TRL's GRPOTrainer with GOAT adapters, generating with transformers' `generate`; with beta > 0 its
KL reference is the base under `disable_goat` (or, with --sft_adapter, that adapter frozen), never a second copy.
The reward is 1 when the completion's final number ("#### n", else the last number) equals the answer, else 0.
Printed before and after training: the exact-answer accuracy on held-out problems the training never saw (greedy).

    PYTHONPATH=. python examples/grpo.py
    PYTHONPATH=. python examples/grpo.py --sft_adapter runs/sft_nlg --max_steps 200 --output_dir runs/grpo
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from dpo_grpo_common import SHARED_DEFAULTS, PolicyArguments, load_policy
from sft_nlg import generated_problems, reference
from transformers import HfArgumentParser

from goat_hf.grpo_trainer import GoatGRPOConfig, GoatGRPOTrainer
from goat_hf.tasks.answers import math_correct
from goat_hf.tasks.generation import generate_responses
from goat_hf.tasks.instruction_data import record_prompt


@dataclass
class ScriptArguments(PolicyArguments):
    num_train: int = field(default=64, metadata={"help": "Training problems (generated, seeded by --seed)."})
    num_eval: int = field(default=64, metadata={"help": "Held-out problems."})


def exact_answer(prompts: list[str], completions: list[str], answer: list[float], **kwargs: Any) -> list[float]:
    """1.0 where the completion's final number is the answer."""
    return [float(math_correct(completion, target)) for completion, target in zip(completions, answer, strict=True)]


def accuracy(model, tokenizer, records: list[dict], max_new_tokens: int) -> float:
    prompts = [record_prompt(record) for record in records]
    responses = generate_responses(model.eval(), tokenizer, prompts, batch_size=16, max_new_tokens=max_new_tokens)
    return sum(math_correct(text, reference(r)) for text, r in zip(responses, records, strict=True)) / len(records)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = HfArgumentParser((ScriptArguments, GoatGRPOConfig))
    parser.set_defaults(
        **SHARED_DEFAULTS, output_dir="runs/grpo_arithmetic", learning_rate=1e-4, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=40, beta=0.04, max_steps=16, logging_steps=4, temperature=1.0,
    )  # fmt: skip
    script, args = parser.parse_args_into_dataclasses(args=argv)
    train, held_out = generated_problems(script.num_train, script.num_eval, args.seed)
    dataset = Dataset.from_list([{"prompt": record_prompt(r), "answer": reference(r)} for r in train])

    model, tokenizer = load_policy(script)
    trainer = GoatGRPOTrainer(
        model=model, reward_funcs=exact_answer, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    print(f"Reference model: {trainer.card_settings['reference model']}")
    results = {"before": accuracy(trainer.model, tokenizer, held_out, args.max_completion_length)}
    trainer.train()
    results["after"] = accuracy(trainer.model, tokenizer, held_out, args.max_completion_length)
    trainer.save_model(args.output_dir)
    before, after = results["before"], results["after"]
    print(f"\nHeld-out problems ({len(held_out)}), exact-answer accuracy: {before:.3f} -> {after:.3f}")
    Path(args.output_dir, "grpo_results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
