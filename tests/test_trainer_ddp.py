"""DDP: two processes train the adapter one process trains on the same micro-batches, balance loss included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from cpu_sharding import run_ranks
from ddp_worker import AUX_LOSS_COEF
from safetensors.torch import load_file
from sharded_checks import largest_difference, reference
from sharded_worker import goat_config
from trainer_fixtures import HEALTH_KEYS, adapter_copy, single_thread

from goat_hf import get_goat_model

TESTS = Path(__file__).parent

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


# ---- 9. DDP ----


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_same_micro_batches(tmp_path):
    """The ranks agree whatever their gradients (DDP all-reduces them): the single-process run, its 2 micro-batches
    accumulated, is what tells whether the gradients and the balance loss were averaged right."""
    run_ranks(TESTS / "ddp_worker.py", tmp_path / "ddp")
    reports = [json.loads((tmp_path / "ddp" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    adapters = [load_file(tmp_path / "ddp" / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert [report["world_size"] for report in reports] == [2, 2]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])

    expected, seen = reference(tmp_path / "single-process", AUX_LOSS_COEF)
    shards = [report["shard"] for report in reports]
    assert shards[0] != shards[1]  # each rank trained on its own data
    assert [batch for pair in zip(*shards, strict=True) for batch in pair] == seen["batches"]
    initial = adapter_copy(get_goat_model(tiny_llama(), goat_config(AUX_LOSS_COEF)))
    assert largest_difference(adapters[0], initial) > 1e-2  # training moved it: the match below is not trivial
    assert largest_difference(adapters[0], expected) < 1e-3

    moved = set(reports[0]["moved"])
    assert {name for name in adapters[0] if name.endswith((".expert_A", ".expert_B", ".router.weight"))} == moved
    assert all(set(HEALTH_KEYS) <= entry.keys() for entry in reports[0]["log_history"] if "loss" in entry)
