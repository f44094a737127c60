"""Batched greedy generation for evaluation: left padding, prompts sorted by length, a tqdm progress bar."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase


def generate_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = 16,
    max_new_tokens: int = 256,
    desc: str = "Generating",
) -> list[str]:
    """Greedy responses to `prompts`, in their order: the new text only, special tokens removed.

    Decoder-only models continue from the last position, so the padding goes on the left. Prompts are
    tokenized exactly as TRL tokenizes a prompt for training (tokenizer defaults, special tokens included)
    and batched longest first, which keeps padding small and shows an out-of-memory batch at once.
    A tokenizer without a pad token pads with its EOS token, as TRL does.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token first.")
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="prompt") as progress:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                input_ids, attention_mask = _left_pad([encoded[i] for i in batch], pad_id)
                output = model.generate(
                    input_ids=input_ids.to(model.device),
                    attention_mask=attention_mask.to(model.device),
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,  # Trainer sets config.use_cache=False for training
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                )
                new_tokens = output[:, input_ids.shape[1] :]  # [B, new]
                for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True):
                    responses[i] = text
                progress.update(len(batch))
    finally:
        model.train(was_training)
    return responses


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, L], the padding on the left."""
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    return input_ids, attention_mask
