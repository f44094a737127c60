"""What test_fsdp2.py and test_deepspeed.py check on a sharded_worker.py run, against single-process references.

The references use the same global batch of 4 as the 2 ranks x 2 micro-batches: as 2 micro-batches of 2 with
gradient accumulation (what the ranks compute, balance loss included: it is a per-forward loss), or, without
the balance loss, as one batch of 4.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from conftest import tiny_llama
from cpu_sharding import run_ranks
from safetensors.torch import load_file
from sharded_worker import STEPS, goat_config, sft_args, sft_trainer, train_args
from trainer_fixtures import adapter_copy, lm_dataset
from transformers import TrainerCallback

from goat_hf import GoatTrainer, get_goat_model, load_goat_adapter
from goat_hf.adapter_io import WEIGHTS_NAME

TESTS = Path(__file__).parent


def run_worker(out: Path, backend: str) -> Path:
    run_ranks(TESTS / "sharded_worker.py", out, backend)
    return out


def reference(tmp_path: Path, aux_loss_coef: float, batch_size: int = 2, accumulation: int = 2) -> tuple[dict, dict]:
    """Single-process GoatTrainer with the worker's settings: final adapter, micro-batches and optimizer groups."""
    args = train_args(
        tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, save_strategy="no"
    )
    model = tiny_llama()
    data = lm_dataset(4 * STEPS)
    return trained(GoatTrainer(model=model, args=args, train_dataset=data, goat_config=goat_config(aux_loss_coef)))


def sft_reference(tmp_path: Path, aux_loss_coef: float) -> tuple[dict, dict]:
    """Single-process GoatSFTTrainer with the worker's settings, its 2 ranks' micro-batches accumulated."""
    return trained(sft_trainer(sft_args(tmp_path, gradient_accumulation_steps=2, save_strategy="no"), aux_loss_coef))


def trained(trainer) -> tuple[dict, dict]:
    """(final adapter, what it saw: micro-batches, optimizer groups, and the adapter after each step)."""
    batches = [batch["input_ids"].tolist() for batch in trainer.get_train_dataloader()]
    snapshots = AdapterAfterEachStep()
    trainer.add_callback(snapshots)
    trainer.train()
    groups = [[g["name"], g["initial_lr"], g["weight_decay"]] for g in trainer.optimizer.param_groups]
    return adapter_copy(trainer.model), {"batches": batches, "optimizer_groups": groups, "steps": snapshots.adapters}


class AdapterAfterEachStep(TrainerCallback):
    def __init__(self) -> None:
        self.adapters: dict[int, dict] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        self.adapters[state.global_step] = adapter_copy(model)


def relative_differences(got: dict, expected: dict) -> dict[str, float]:
    """||got - expected|| / ||expected|| per tensor; the key sets must be equal."""
    assert got.keys() == expected.keys()
    return {key: ((got[key] - expected[key]).norm() / expected[key].norm()).item() for key in expected}


def largest_difference(got: dict, expected: dict) -> float:
    return max(relative_differences(got, expected).values())


def adapter_file(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_NAME)


def reports(out: Path) -> list[dict]:
    return [json.loads((out / f"report{rank}.json").read_text()) for rank in (0, 1)]


def check_equals_single_process(out: Path, tmp_path: Path, aux_loss_coef: float, sft: bool = False) -> float:
    """The 2-rank adapter vs the single-process one on the same micro-batches; returns the largest difference.

    sft: the GoatSFTTrainer runs (sft{coef}) instead of the GoatTrainer ones (aux{coef})."""
    expected, seen = (sft_reference if sft else reference)(tmp_path, aux_loss_coef)
    run = f"{'sft' if sft else 'aux'}{aux_loss_coef:g}"
    shards = [report[run]["shard"] for report in reports(out)]
    assert shards[0] != shards[1]  # each rank trained on its own data
    assert [batch for pair in zip(*shards, strict=True) for batch in pair] == seen["batches"]
    assert all(report[run]["optimizer_groups"] == seen["optimizer_groups"] for report in reports(out))

    final = adapter_file(out / run / "final")
    initial = adapter_copy(get_goat_model(tiny_llama(), goat_config(aux_loss_coef)))
    assert largest_difference(final, initial) > 1e-2  # training moved it: the match below is not trivial
    difference = largest_difference(final, expected)
    assert difference < 1e-3
    return difference


def check_checkpoint_adapters(out: Path, tmp_path: Path) -> None:
    """Each checkpoint's adapter file is the whole adapter of its step: the single-process run's after that step (not
    a rank's shard, nor another step's); the final one loads onto a fresh base as the single-process adapter."""
    _, seen = reference(tmp_path, 0.1)
    for step in (2, 4):
        folder = out / "aux0.1" / f"checkpoint-{step}"
        assert not list(folder.glob("*model*"))  # no base weights (model.safetensors, pytorch_model*.bin, FSDP's)
        assert largest_difference(adapter_file(folder), seen["steps"][step]) < 1e-3, step
    assert largest_difference(seen["steps"][2], seen["steps"][4]) > 1e-2  # the two steps are told apart
    # The W0 fingerprints are taken on the gathered weights: a shard's would not match the fresh base.
    model = load_goat_adapter(tiny_llama(), out / "aux0.1" / "final")
    assert largest_difference(adapter_copy(model), seen["steps"][STEPS]) < 1e-3


def check_resume_equals_uninterrupted(out: Path) -> None:
    assert all(report["resumed_steps"] == STEPS - 2 for report in reports(out))  # it did resume at step 2
    uninterrupted = adapter_file(out / "aux0.1" / "final")
    assert largest_difference(adapter_file(out / "resumed"), uninterrupted) < 1e-6
    assert largest_difference(adapter_file(out / "aux0.1" / "checkpoint-2"), uninterrupted) > 1e-2


def check_best_model_restored(out: Path) -> None:
    best = Path(reports(out)[0]["best_model_checkpoint"])
    assert best.name == "checkpoint-2"  # the highest eval loss, by the worker's greater_is_better=True
    final = adapter_file(out / "best" / "final")
    assert largest_difference(final, adapter_file(best)) == 0
    assert largest_difference(final, adapter_file(out / "best" / "checkpoint-4")) > 1e-2


def check_bf16_refused_and_bf16_base_trains(out: Path, refusal_start: str) -> None:
    """bf16=True is refused with the fix in the message; the fix (a bf16 base, fp32 adapters, no cast) trains."""
    for report in reports(out):
        message = report["bf16_refusal"]
        assert message is not None and message.startswith(refusal_start)
        assert "--bf16 false" in message and "mixed_precision: 'no'" in message
    run = reports(out)[0]["bf16_base"]
    assert run["frozen_dtypes"] == ["torch.bfloat16"] and run["trainable_dtypes"] == ["torch.float32"]
    assert len(run["losses"]) == 2 and all(math.isfinite(loss) for loss in run["losses"])
    saved = adapter_file(out / "bf16-base" / "final")
    assert all(tensor.dtype == torch.float32 for tensor in saved.values())
    initial = adapter_copy(get_goat_model(tiny_llama().to(torch.bfloat16), goat_config(0.1)))
    assert largest_difference(saved, {key: value.float() for key, value in initial.items()}) > 1e-2  # it trained
