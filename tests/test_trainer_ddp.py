"""DDP: two processes train identical adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cpu_sharding import run_ranks
from safetensors.torch import load_file
from trainer_fixtures import (
    HEALTH_KEYS,
    single_thread,
)

TESTS = Path(__file__).parent

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


# ---- 9. DDP ----


@pytest.mark.slow
def test_ddp_two_processes_train_identical_adapters(tmp_path):
    run_ranks(TESTS / "ddp_worker.py", tmp_path)

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    adapters = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert [report["world_size"] for report in reports] == [2, 2]
    assert reports[0]["shard"] != reports[1]["shard"]  # each rank trained on other data: the identity is DDP's doing
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])
    moved = set(reports[0]["moved"])
    assert {name for name in adapters[0] if name.endswith((".expert_A", ".expert_B", ".router.weight"))} == moved
    assert all(set(HEALTH_KEYS) <= entry.keys() for entry in reports[0]["log_history"] if "loss" in entry)
