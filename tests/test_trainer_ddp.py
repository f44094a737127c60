"""DDP: two processes train identical adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS.parent)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(TESTS / "ddp_worker.py"),
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    adapters = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert [report["world_size"] for report in reports] == [2, 2]
    assert reports[0]["shard"] != reports[1]["shard"]  # each rank trained on other data: the identity is DDP's doing
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])
    moved = set(reports[0]["moved"])
    assert {name for name in adapters[0] if name.endswith((".expert_A", ".expert_B", ".router.weight"))} == moved
    assert all(set(HEALTH_KEYS) <= entry.keys() for entry in reports[0]["log_history"] if "loss" in entry)
