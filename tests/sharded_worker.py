"""One rank of the FSDP2 / DeepSpeed tests: `torchrun --nproc_per_node 2 tests/sharded_worker.py OUT_DIR BACKEND`.

BACKEND is fsdp2 (`fsdp="full_shard"`, `fsdp_version: 2`), zero2 or zero3 (DeepSpeed ZeRO stage 2 / 3), CPU and
gloo, with sharding really on (see cpu_sharding.py). GoatTrainer trains a tiny Llama in phases sharing one
process group:
- train/aux{coef}: 4 steps, checkpoints at 2 and 4, then `save_model(final)`, for each coef in COEFS[BACKEND];
- resume: a fresh model resumed from aux0.1/checkpoint-2 to step 4, then `save_model(resumed)`;
- sft{coef} (fsdp2 only): GoatSFTTrainer, 2 steps in fp32 (SFTConfig's default is bf16), a checkpoint at 2,
  then `save_model(final)`, for each coef in COEFS[BACKEND];
- bf16: `bf16=True` (FSDP's mixed-precision cast, DeepSpeed's bf16 mode) must be refused; a bf16 base with fp32
  adapters trains 2 steps (bf16-base);
- best: evaluation at steps 2 and 4 with `load_best_model_at_end` (the *highest* eval loss is "best", so the
  best checkpoint is not simply the last one), then `save_model(final)`.
Each rank writes OUT_DIR/report{rank}.json: what it saw of the sharding, its data, its optimizer groups, and the
best checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import tiny_llama
from cpu_sharding import shard_on_cpu
from torch.distributed.tensor import DTensor
from trainer_fixtures import cpu_args, lm_dataset
from transformers import TrainerCallback

from goat_hf import GoatConfig, GoatTrainer, GoatTrainingArguments
from goat_hf.distributed import is_zero3_partitioned

STEPS = 4
COEFS = {"fsdp2": (0.0, 0.1), "zero2": (0.1,), "zero3": (0.1,)}
WRAP = {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
BACKENDS = {
    "fsdp2": dict(fsdp="full_shard", fsdp_config=WRAP),
    **{
        f"zero{stage}": dict(
            deepspeed={
                "zero_optimization": {"stage": stage},
                **dict.fromkeys(["train_micro_batch_size_per_gpu", "gradient_accumulation_steps"], "auto"),
                **dict.fromkeys(["train_batch_size", "gradient_clipping"], "auto"),
            }
        )
        for stage in (2, 3)
    },
}


def goat_config(aux_loss_coef: float) -> GoatConfig:
    return GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=aux_loss_coef)


def train_args(output_dir: Path, backend: str | None = None, **overrides) -> GoatTrainingArguments:
    """The settings of every run; the test's single-process reference passes backend=None."""
    settings = dict(max_steps=STEPS, learning_rate=1e-2, router_learning_rate=3e-3, save_strategy="steps", save_steps=2)
    if backend is not None:
        settings.update(ddp_backend="gloo", **BACKENDS[backend])
    return cpu_args(output_dir, GoatTrainingArguments, **{**settings, **overrides})


def sharding_report(trainer: GoatTrainer) -> dict:
    params = dict(trainer.model.named_parameters())
    dtensors = [name for name, p in params.items() if isinstance(p, DTensor) and p.to_local().numel() < p.numel()]
    zero3 = [name for name, p in params.items() if is_zero3_partitioned(p) and p.ds_tensor.numel() < p.ds_numel]
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "parameters": len(params),
        "sharded_dtensors": len(dtensors),
        "zero3_partitioned": len(zero3),
        "optimizer_groups": [
            [g.get("name"), g["initial_lr"], g["weight_decay"]] for g in trainer.optimizer.param_groups
        ],
    }


def train_phase(out_dir: Path, backend: str, aux_loss_coef: float) -> dict:
    run = out_dir / f"aux{aux_loss_coef:g}"
    data = lm_dataset(4 * STEPS)
    trainer = GoatTrainer(
        model=tiny_llama(), args=train_args(run, backend), train_dataset=data, goat_config=goat_config(aux_loss_coef)
    )
    shard = [batch["input_ids"].tolist() for batch in trainer.get_train_dataloader()]
    trainer.train()
    trainer.save_model(str(run / "final"))
    return {"shard": shard, **sharding_report(trainer)}


def resume_phase(out_dir: Path, backend: str) -> int:
    """Returns the number of optimizer steps the resumed run took."""
    run = out_dir / "aux0.1"
    data = lm_dataset(4 * STEPS)
    steps = StepCounter()
    trainer = GoatTrainer(
        model=tiny_llama(),
        args=train_args(run, backend),
        train_dataset=data,
        goat_config=goat_config(0.1),
        callbacks=[steps],
    )
    trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    trainer.save_model(str(out_dir / "resumed"))
    return steps.count


class StepCounter(TrainerCallback):
    count = 0

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.count += 1


def best_phase(out_dir: Path, backend: str) -> str:
    run = out_dir / "best"
    evaluation = dict(eval_strategy="steps", eval_steps=2, load_best_model_at_end=True)
    args = train_args(run, backend, **evaluation, metric_for_best_model="eval_loss", greater_is_better=True)
    data = lm_dataset(4 * STEPS)
    trainer = GoatTrainer(
        model=tiny_llama(), args=args, train_dataset=data, eval_dataset=data, goat_config=goat_config(0.1)
    )
    trainer.train()
    trainer.save_model(str(run / "final"))
    return trainer.state.best_model_checkpoint


def sft_args(output_dir: Path, backend: str | None = None, **overrides):
    """fp32 (bf16=False): SFTConfig's bf16 default rounds differently under FSDP2's MixedPrecisionPolicy than under
    one process's autocast, and AdamW's first steps (about lr * sign(g)) turn that rounding into differences as
    large as training's own moves; the worker compares exact arithmetic."""
    from trl import SFTConfig

    settings = dict(max_steps=2, learning_rate=1e-2, save_strategy="steps", save_steps=2, bf16=False)
    if backend is not None:
        settings.update(ddp_backend="gloo", **BACKENDS[backend])
    return cpu_args(output_dir, SFTConfig, **{**settings, **overrides})


def sft_trainer(args, aux_loss_coef: float = 0.1):
    """GoatSFTTrainer on test_trainer_trl's prompt-completion data (completion-only loss, padded batches of
    different lengths, so the loss is normalised by num_items_in_batch across the ranks)."""
    from test_trainer_trl import prompt_completion_dataset, word_tokenizer

    from goat_hf import GoatSFTTrainer

    data = prompt_completion_dataset(8)
    return GoatSFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=data,
        processing_class=word_tokenizer(),
        goat_config=goat_config(aux_loss_coef),
    )


def sft_phase(out_dir: Path, backend: str, aux_loss_coef: float) -> dict:
    run = out_dir / f"sft{aux_loss_coef:g}"
    trainer = sft_trainer(sft_args(run, backend), aux_loss_coef)
    shard = [batch["input_ids"].tolist() for batch in trainer.get_train_dataloader()]
    trainer.train()
    trainer.save_model(str(run / "final"))
    return {"shard": shard, **sharding_report(trainer)}


def bf16_phases(out_dir: Path, backend: str) -> dict:
    """bf16 mixed precision (FSDP's cast, DeepSpeed's bf16 mode) is refused: it would cast the fp32 adapters. A bf16
    base with fp32 adapters and no cast trains sharded."""
    data = lm_dataset(8)
    try:
        args = train_args(out_dir / "bf16-cast", backend, bf16=True, save_strategy="no")
        GoatTrainer(model=tiny_llama(), args=args, train_dataset=data, goat_config=goat_config(0.1)).train()
        refusal = None
    except ValueError as error:
        refusal = str(error)
    args = train_args(out_dir / "bf16-base", backend, max_steps=2, save_strategy="no")
    model = tiny_llama().to(torch.bfloat16)
    trainer = GoatTrainer(model=model, args=args, train_dataset=data, goat_config=goat_config(0.1))
    trainer.train()
    trainer.save_model(str(out_dir / "bf16-base" / "final"))
    frozen = {str(p.dtype) for p in trainer.model.parameters() if not p.requires_grad}
    trainable = {str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    report = sharding_report(trainer) | {"frozen_dtypes": sorted(frozen), "trainable_dtypes": sorted(trainable)}
    return {"bf16_refusal": refusal, "bf16_base": report | {"losses": losses}}


def main(out_dir: Path, backend: str) -> None:
    torch.set_num_threads(1)
    shard_on_cpu()
    report = {f"aux{coef:g}": train_phase(out_dir, backend, coef) for coef in COEFS[backend]}
    report["resumed_steps"] = resume_phase(out_dir, backend)
    report["best_model_checkpoint"] = best_phase(out_dir, backend)
    if backend == "fsdp2":
        report |= {f"sft{coef:g}": sft_phase(out_dir, backend, coef) for coef in COEFS[backend]}
    report |= bf16_phases(out_dir, backend)
    (out_dir / f"report{torch.distributed.get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
