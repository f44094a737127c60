"""DPO with GOAT on SmolLM2-135M-Instruct, offline: preference pairs built from real labelled tweets.

Each pair asks for the sentiment of a tweet (negative / neutral / positive): the chosen answer is the gold label, the
rejected one another label (seeded). GoatDPOTrainer is TRL's DPOTrainer with GOAT adapters; its reference model is
the base under `disable_goat` (no second copy), or, with --sft_adapter, that adapter frozen.

Printed before and after training, on held-out tweets the training never saw:
- answer accuracy: the label whose answer the model gives the highest log-probability is the gold one;
- pair accuracy: the model gives the chosen answer a higher log-probability than the rejected one;
- DPO's own held-out metrics (reward margin and reward accuracy against the reference).

    PYTHONPATH=. python examples/dpo.py                       # 16 DPO steps of 8 pairs
    PYTHONPATH=. python examples/dpo.py --num_train 1024 --num_train_epochs 2 --output_dir runs/dpo
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from dpo_grpo_common import SHARED_DEFAULTS, PolicyArguments, load_policy
from transformers import HfArgumentParser, PreTrainedTokenizerBase

from goat_hf.dpo_trainer import GoatDPOConfig, GoatDPOTrainer
from goat_hf.tasks.tweets import LABELS, tweet_splits

QUESTION = "What is the sentiment of this tweet? Answer negative, neutral or positive.\n\nTweet: {text}"


@dataclass
class ScriptArguments(PolicyArguments):
    num_train: int = field(default=128, metadata={"help": "Training pairs (one per tweet)."})
    num_eval: int = field(default=90, metadata={"help": "Held-out tweets."})


def preference_pairs(rows: list[dict[str, Any]], seed: int) -> Dataset:
    """Conversational pairs: chosen = the gold label, rejected = one of the two others (seeded)."""
    rng = random.Random(seed)
    pairs = []
    for row in rows:
        wrong = rng.choice([label for label in range(len(LABELS)) if label != row["label"]])
        pairs.append(
            {
                "prompt": [{"role": "user", "content": QUESTION.format(text=row["text"])}],
                "chosen": [{"role": "assistant", "content": LABELS[row["label"]]}],
                "rejected": [{"role": "assistant", "content": LABELS[wrong]}],
            }
        )
    return Dataset.from_list(pairs)


@torch.no_grad()
def answer_log_probs(model, tokenizer: PreTrainedTokenizerBase, pairs: Dataset, batch_size: int = 16) -> torch.Tensor:
    """[pairs, labels]: the summed log-probability of each label's answer after each prompt."""
    model.eval()
    sequences = []
    for pair in pairs:
        prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True)["input_ids"]
        for label in LABELS:
            full = tokenizer.apply_chat_template(pair["prompt"] + [{"role": "assistant", "content": label}])
            sequences.append((full["input_ids"], len(prompt)))
    scores = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        length = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([ids + [tokenizer.pad_token_id] * (length - len(ids)) for ids, _ in chunk])
        mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in chunk])
        log_probs = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
        token_log_probs = log_probs.gather(-1, ids[:, 1:, None])[..., 0]  # [B, L-1]
        for row, (tokens, prompt_length) in enumerate(chunk):
            scores.append(token_log_probs[row, prompt_length - 1 : len(tokens) - 1].sum())
    return torch.stack(scores).view(len(pairs), len(LABELS))


def held_out_metrics(trainer: GoatDPOTrainer, tokenizer, pairs: Dataset) -> dict[str, float]:
    scores = answer_log_probs(trainer.model, tokenizer, pairs)
    gold = torch.tensor([LABELS.index(pair["chosen"][0]["content"]) for pair in pairs])
    wrong = torch.tensor([LABELS.index(pair["rejected"][0]["content"]) for pair in pairs])
    picked = scores.gather(1, gold[:, None])[:, 0] > scores.gather(1, wrong[:, None])[:, 0]
    dpo = trainer.evaluate()
    return {
        "answer_accuracy": (scores.argmax(1) == gold).float().mean().item(),
        "pair_accuracy": picked.float().mean().item(),
        "reward_margin": dpo["eval_rewards/margins"],
        "reward_accuracy": dpo["eval_rewards/accuracies"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = HfArgumentParser((ScriptArguments, GoatDPOConfig))
    parser.set_defaults(
        **SHARED_DEFAULTS, output_dir="runs/dpo_tweets", learning_rate=3e-4, per_device_train_batch_size=8,
        per_device_eval_batch_size=16, num_train_epochs=1, beta=0.1, logging_steps=8, max_length=192,
    )  # fmt: skip
    script, args = parser.parse_args_into_dataclasses(args=argv)
    splits = tweet_splits(train=script.num_train, validation=0, test=script.num_eval, pool=1)
    train, held_out = preference_pairs(splits.train, args.seed), preference_pairs(splits.test, args.seed + 1)

    model, tokenizer = load_policy(script)
    trainer = GoatDPOTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=held_out, processing_class=tokenizer
    )
    print(f"Reference model: {trainer.card_settings['reference model']}")
    results = {"before": held_out_metrics(trainer, tokenizer, held_out)}
    trainer.train()
    results["after"] = held_out_metrics(trainer, tokenizer, held_out)
    trainer.save_model(args.output_dir)

    print(f"\nHeld-out tweets ({len(held_out)}), before -> after DPO:")
    for key in results["before"]:
        print(f"  {key:16s} {results['before'][key]:.3f} -> {results['after'][key]:.3f}")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    Path(args.output_dir, "dpo_results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
