"""One rank of the FSDP2 test: `torchrun --nproc_per_node 2 tests/fsdp2_worker.py OUT_DIR` (CPU, gloo).

Runs GoatTrainer with `fsdp="full_shard"`, `fsdp_config={"fsdp_version": 2}` (sharding really on, see
cpu_sharding.py) on a tiny Llama, in three phases sharing one process group:
- train/aux{coef}: 4 steps, checkpoints at 2 and 4, then `save_model(final)`, for coef 0 and 0.1;
- resume: a fresh model resumed from train/aux0.1/checkpoint-2 to step 4, then `save_model(final)`;
- best: evaluation at steps 2 and 4 with `load_best_model_at_end` (the *highest* eval loss is "best", so the
  best checkpoint is not simply the last one), then `save_model(final)`.
Rank 0 writes OUT_DIR/report.json: what each rank saw of the sharding and of its data, and the best checkpoint.
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

from goat_hf import GoatConfig, GoatTrainer

STEPS = 4
FSDP = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})


def goat_config(aux_loss_coef: float) -> GoatConfig:
    return GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=aux_loss_coef)


def train_args(output_dir: Path, **overrides):
    """The settings the test's single-process reference repeats with gradient accumulation instead of 2 ranks."""
    settings = dict(ddp_backend="gloo", max_steps=STEPS, learning_rate=1e-2, save_strategy="steps", save_steps=2)
    return cpu_args(output_dir, **{**settings, **FSDP, **overrides})


def sharding_report(model: torch.nn.Module) -> dict:
    params = dict(model.named_parameters())
    dtensors = {name: p for name, p in params.items() if isinstance(p, DTensor)}
    return {
        "parameters": len(params),
        "dtensors": len(dtensors),
        "sharded": sorted(name for name, p in dtensors.items() if p.to_local().numel() < p.numel()),
    }


def train_phase(out_dir: Path, aux_loss_coef: float) -> dict:
    run = out_dir / f"aux{aux_loss_coef:g}"
    trainer = GoatTrainer(
        model=tiny_llama(),
        args=train_args(run),
        train_dataset=lm_dataset(4 * STEPS),
        goat_config=goat_config(aux_loss_coef),
    )
    shard = [batch["input_ids"].tolist() for batch in trainer.get_train_dataloader()]
    trainer.train()
    trainer.save_model(str(run / "final"))
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "shard": shard,
        **sharding_report(trainer.model),
    }


def resume_phase(out_dir: Path) -> None:
    run = out_dir / "aux0.1"
    trainer = GoatTrainer(
        model=tiny_llama(), args=train_args(run), train_dataset=lm_dataset(4 * STEPS), goat_config=goat_config(0.1)
    )
    trainer.train(resume_from_checkpoint=str(run / "checkpoint-2"))
    trainer.save_model(str(out_dir / "resumed"))


def best_phase(out_dir: Path) -> str:
    run = out_dir / "best"
    args = train_args(
        run,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
    )
    data = lm_dataset(4 * STEPS)
    trainer = GoatTrainer(
        model=tiny_llama(), args=args, train_dataset=data, eval_dataset=data, goat_config=goat_config(0.1)
    )
    trainer.train()
    trainer.save_model(str(run / "final"))
    return trainer.state.best_model_checkpoint


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    shard_on_cpu()
    report = {f"aux{coef:g}": train_phase(out_dir, coef) for coef in (0.0, 0.1)}
    resume_phase(out_dir)
    report["best_model_checkpoint"] = best_phase(out_dir)
    rank = torch.distributed.get_rank()
    (out_dir / f"report{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
