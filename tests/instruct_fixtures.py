"""Helpers shared by the generation and instruction-tuning tests: the SmolLM2 tokenizer on a tiny Llama."""

from __future__ import annotations

import functools
from pathlib import Path

from conftest import tiny_llama
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from goat_hf.tasks.assets import smollm2_path


@functools.cache
def _smollm2_tokenizer_folder() -> Path:
    return smollm2_path()  # converts the GGUF once (~15 s), then cached on disk


def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """A fresh SmolLM2-135M-Instruct tokenizer (a real BPE tokenizer with EOS = pad = <|im_end|>)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smollm2_tokenizer_folder())


def tiny_instruct_llama(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """conftest's 2-layer Llama over the tokenizer's vocabulary (weights from `seed`), long enough for prompts."""
    return tiny_llama(
        seed,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def save_tiny_instruct_model(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama and the SmolLM2 tokenizer in `folder`, for --model_name_or_path."""
    tokenizer = smollm2_tokenizer()
    tiny_instruct_llama(tokenizer, seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
