"""GoatTrainer under FSDP2 with 2 CPU processes, sharding really on (sharded_worker.py, cpu_sharding.py)."""

from __future__ import annotations

import pytest
from conftest import tiny_llama
from sharded_checks import (
    adapter_file,
    check_best_model_restored,
    check_bf16_refused_and_bf16_base_trains,
    check_checkpoint_adapters,
    check_equals_single_process,
    check_resume_equals_uninterrupted,
    largest_difference,
    reference,
    reports,
    run_worker,
    sft_reference,
)
from trainer_fixtures import adapter_copy, single_thread

from goat_hf import load_goat_adapter

pytestmark = pytest.mark.slow
single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("fsdp2"), "fsdp2")


def test_every_parameter_is_a_sharded_dtensor(fsdp_run):
    for report in reports(fsdp_run):
        for run in ("aux0", "aux0.1"):
            assert report[run]["distributed_type"] == "DistributedType.FSDP"
            assert report[run]["sharded_dtensors"] == report[run]["parameters"]


@pytest.mark.parametrize("aux_loss_coef", [0.0, 0.1], ids=["no-balance-loss", "balance-loss"])
def test_adapter_equals_single_process_on_the_same_micro_batches(fsdp_run, tmp_path, aux_loss_coef):
    check_equals_single_process(fsdp_run, tmp_path, aux_loss_coef)


def test_adapter_equals_one_batch_of_the_global_size_without_balance_loss(fsdp_run, tmp_path):
    expected, _ = reference(tmp_path, 0.0, batch_size=4, accumulation=1)
    assert largest_difference(adapter_file(fsdp_run / "aux0" / "final"), expected) < 1e-3


def test_checkpoints_hold_the_whole_adapter_and_the_optimizer_only(fsdp_run, tmp_path):
    check_checkpoint_adapters(fsdp_run, tmp_path)
    for step in (2, 4):
        folder = fsdp_run / "aux0.1" / f"checkpoint-{step}"
        assert not [path for path in folder.iterdir() if path.is_dir()]  # no pytorch_model_fsdp_0 / optimizer_0
        assert (folder / "optimizer.bin").is_file() and (folder / "scheduler.pt").is_file()


def test_resume_equals_uninterrupted(fsdp_run):
    check_resume_equals_uninterrupted(fsdp_run)


def test_load_best_model_at_end_restores_the_best_checkpoint(fsdp_run):
    check_best_model_restored(fsdp_run)


@pytest.mark.parametrize("aux_loss_coef", [0.0, 0.1], ids=["no-balance-loss", "balance-loss"])
def test_sft_trainer_equals_single_process_on_the_same_micro_batches(fsdp_run, tmp_path, aux_loss_coef):
    for report in reports(fsdp_run):
        run = report[f"sft{aux_loss_coef:g}"]
        assert run["distributed_type"] == "DistributedType.FSDP"
        assert run["sharded_dtensors"] == run["parameters"]
    check_equals_single_process(fsdp_run, tmp_path, aux_loss_coef, sft=True)


def test_sft_trainer_checkpoint_holds_the_whole_adapter(fsdp_run, tmp_path):
    expected, _ = sft_reference(tmp_path, 0.1)  # 2 steps: the checkpoint at step 2 holds the final adapter
    model = load_goat_adapter(tiny_llama(), fsdp_run / "sft0.1" / "checkpoint-2")  # fingerprints of the whole W0
    assert largest_difference(adapter_copy(model), expected) < 1e-3


def test_bf16_mixed_precision_is_refused_and_a_bf16_base_trains_sharded(fsdp_run):
    check_bf16_refused_and_bf16_base_trains(fsdp_run, "FSDP mixed precision (param_dtype=torch.bfloat16) would cast")
    run = reports(fsdp_run)[0]["bf16_base"]
    assert run["distributed_type"] == "DistributedType.FSDP" and run["sharded_dtensors"] == run["parameters"]
