"""GoatTrainer under DeepSpeed ZeRO-2 and ZeRO-3 with 2 CPU processes (sharded_worker.py, cpu_sharding.py)."""

from __future__ import annotations

import pytest
import torch
from sharded_checks import (
    adapter_file,
    check_best_model_restored,
    check_bf16_refused_and_bf16_base_trains,
    check_checkpoint_adapters,
    check_equals_single_process,
    check_resume_equals_uninterrupted,
    reports,
    run_worker,
)
from trainer_fixtures import single_thread

pytest.importorskip("deepspeed", reason="DeepSpeed tests need `pip install deepspeed` (the [deepspeed] extra)")
pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]  # not in `make test`: `make test-deepspeed`
single_thread = pytest.fixture(scope="module", autouse=True)(single_thread)


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def zero_run(request, tmp_path_factory):
    return request.param, run_worker(tmp_path_factory.mktemp(request.param), request.param)


def test_deepspeed_runs_with_the_stage_asked_for(zero_run):
    backend, out = zero_run
    for report in reports(out):
        assert report["aux0.1"]["distributed_type"] == "DistributedType.DEEPSPEED"
        partitioned = report["aux0.1"]["zero3_partitioned"]
        assert partitioned == (report["aux0.1"]["parameters"] if backend == "zero3" else 0)


def test_adapter_and_optimizer_groups_equal_single_process(zero_run, tmp_path):
    check_equals_single_process(zero_run[1], tmp_path, 0.1)


def test_checkpoints_hold_the_adapter_and_no_frozen_weights(zero_run, tmp_path):
    out = zero_run[1]
    check_checkpoint_adapters(out, tmp_path)
    adapter_keys = adapter_file(out / "aux0.1" / "checkpoint-2").keys()
    states = list((out / "aux0.1" / "checkpoint-2" / "global_step2").glob("*model_states.pt"))
    assert states
    for path in states:
        engine_state = torch.load(path, weights_only=False)  # DeepSpeed's own pickle, written by this test's run
        assert set(engine_state["module"]) <= set(adapter_keys)  # adapter and residual factors, no base weights
        assert not engine_state.get("frozen_param_fragments")


def test_resume_equals_uninterrupted(zero_run):
    check_resume_equals_uninterrupted(zero_run[1])


def test_load_best_model_at_end_restores_the_best_checkpoint(zero_run):
    check_best_model_restored(zero_run[1])


def test_bf16_mode_is_refused_and_a_bf16_base_trains(zero_run):
    backend, out = zero_run
    check_bf16_refused_and_bf16_base_trains(out, "DeepSpeed bf16 (`bf16.enabled`) would cast")
    run = reports(out)[0]["bf16_base"]
    assert run["zero3_partitioned"] == (run["parameters"] if backend == "zero3" else 0)
