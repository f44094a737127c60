"""GoatTrainer under FSDP2 with 2 CPU processes, sharding really on (fsdp2_worker.py, cpu_sharding.py).

One torchrun launch trains, resumes and loads the best checkpoint; the single-process references run here. The
references use the same global batch of 4 as the 2 ranks x 2: as 2 micro-batches of 2 (gradient accumulation),
which is what the ranks compute, and, with the balance loss off, as one batch of 4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from cpu_sharding import torchrun
from fsdp2_worker import STEPS, goat_config
from safetensors.torch import load_file
from trainer_fixtures import adapter_copy, cpu_args, lm_dataset, single_thread

from goat_hf import GoatTrainer, get_goat_model, load_goat_adapter
from goat_hf.adapter_io import WEIGHTS_NAME

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent
single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    torchrun(TESTS / "fsdp2_worker.py", out)
    return out


def reference(tmp_path: Path, aux_loss_coef: float, batch_size: int, accumulation: int) -> tuple[dict, list]:
    """Single-process GoatTrainer on the same data and settings: final adapter and the micro-batches it saw."""
    args = cpu_args(
        tmp_path,
        max_steps=STEPS,
        learning_rate=1e-2,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
    )
    model = tiny_llama()
    trainer = GoatTrainer(
        model=model, args=args, train_dataset=lm_dataset(4 * STEPS), goat_config=goat_config(aux_loss_coef)
    )
    batches = [batch["input_ids"].tolist() for batch in trainer.get_train_dataloader()]
    trainer.train()
    return adapter_copy(model), batches


def relative_differences(got: dict, expected: dict) -> dict[str, float]:
    assert got.keys() == expected.keys()
    return {key: ((got[key] - expected[key]).norm() / expected[key].norm()).item() for key in expected}


def adapter_file(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_NAME)


def reports(out: Path) -> list[dict]:
    return [json.loads((out / f"report{rank}.json").read_text()) for rank in (0, 1)]


def test_parameters_are_sharded_dtensors(fsdp_run):
    for report in reports(fsdp_run):
        for run in ("aux0", "aux0.1"):
            assert report[run]["distributed_type"] == "DistributedType.FSDP"
            assert report[run]["dtensors"] == report[run]["parameters"]  # every parameter is a DTensor ...
            assert len(report[run]["sharded"]) == report[run]["parameters"]  # ... holding part of the tensor


@pytest.mark.parametrize("aux_loss_coef", [0.0, 0.1], ids=["no-balance-loss", "balance-loss"])
def test_adapter_equals_single_process_on_the_same_global_batch(fsdp_run, tmp_path, aux_loss_coef):
    expected, micro_batches = reference(tmp_path, aux_loss_coef, batch_size=2, accumulation=2)
    shards = [report[f"aux{aux_loss_coef:g}"]["shard"] for report in reports(fsdp_run)]
    assert [batch for pair in zip(*shards, strict=True) for batch in pair] == micro_batches  # same data, same order

    final = adapter_file(fsdp_run / f"aux{aux_loss_coef:g}" / "final")
    assert max(relative_differences(final, expected).values()) < 1e-3
    initial = adapter_copy(get_goat_model(tiny_llama(), goat_config(aux_loss_coef)))
    assert max(relative_differences(final, initial).values()) > 1e-2  # training moved it: the match is not trivial


def test_adapter_equals_one_batch_of_the_global_size_without_balance_loss(fsdp_run, tmp_path):
    expected, _ = reference(tmp_path, 0.0, batch_size=4, accumulation=1)
    final = adapter_file(fsdp_run / "aux0" / "final")
    assert max(relative_differences(final, expected).values()) < 1e-3


def test_checkpoints_hold_the_whole_adapter_and_nothing_else(fsdp_run, tmp_path):
    expected, _ = reference(tmp_path, 0.1, batch_size=2, accumulation=2)
    for step in (2, 4):
        folder = fsdp_run / "aux0.1" / f"checkpoint-{step}"
        assert not any(path.is_dir() for path in folder.iterdir())  # no FSDP sharded model or optimizer folders
        assert not list(folder.glob("*model*"))  # no base weights (model.safetensors, pytorch_model*.bin)
        tensors = adapter_file(folder)
        assert {key: tuple(value.shape) for key, value in tensors.items()} == {
            key: tuple(value.shape) for key, value in expected.items()
        }  # every adapter tensor whole, not a rank's shard
        assert (folder / "optimizer.bin").is_file() and (folder / "scheduler.pt").is_file()


def test_saved_adapter_loads_onto_a_fresh_base(fsdp_run):
    """The W0 fingerprints are taken on the gathered weights: a shard's would not match the fresh base."""
    model = load_goat_adapter(tiny_llama(), fsdp_run / "aux0.1" / "final")
    assert max(relative_differences(adapter_copy(model), adapter_file(fsdp_run / "aux0.1" / "final")).values()) == 0


def test_resume_equals_uninterrupted(fsdp_run):
    resumed = adapter_file(fsdp_run / "resumed")
    uninterrupted = adapter_file(fsdp_run / "aux0.1" / "final")
    assert max(relative_differences(resumed, uninterrupted).values()) < 1e-6
    halfway = adapter_file(fsdp_run / "aux0.1" / "checkpoint-2")
    assert max(relative_differences(halfway, uninterrupted).values()) > 1e-2


def test_load_best_model_at_end_restores_the_best_checkpoint(fsdp_run):
    best = reports(fsdp_run)[0]["best_model_checkpoint"]
    assert Path(best).name == "checkpoint-2"  # highest eval loss, by the worker's greater_is_better=True
    final = adapter_file(fsdp_run / "best" / "final")
    assert max(relative_differences(final, adapter_file(Path(best))).values()) == 0
    assert max(relative_differences(final, adapter_file(fsdp_run / "best" / "checkpoint-4")).values()) > 1e-2
