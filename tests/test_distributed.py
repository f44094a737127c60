"""goat_hf.distributed on real sharded tensors in a 1-process gloo group: DTensors and ZeRO-3 parameters.

The 2-process gathering itself is tested end to end in test_fsdp2.py and test_deepspeed.py.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_llama
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from goat_hf import GoatConfig, get_goat_model
from goat_hf.distributed import copy_full_, full_tensor, is_zero3_partitioned


@pytest.fixture(scope="module")
def process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # deepspeed.init_distributed sets RANK, MASTER_ADDR, ...: later tests must not see them
    environment = dict(os.environ)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


def test_dtensor_round_trip(process_group):
    whole = torch.randn(6, 4)
    sharded = distribute_tensor(whole.clone(), process_group, [Shard(0)])
    assert isinstance(sharded, DTensor) and torch.equal(full_tensor(sharded), whole)
    new = torch.randn(6, 4)
    copy_full_(sharded, new)
    assert torch.equal(sharded.full_tensor(), new)


def test_plain_tensors_pass_through():
    tensor = torch.randn(3, 2)
    assert full_tensor(tensor).data_ptr() == tensor.data_ptr()  # no copy for an unsharded tensor
    copy_full_(tensor, torch.ones(3, 2))
    assert torch.equal(tensor, torch.ones(3, 2))


def test_injection_refuses_a_dtensor_weight(process_group):
    model = tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight = nn.Parameter(distribute_tensor(q_proj.weight.detach(), process_group, [Shard(0)]))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' has a sharded weight, an FSDP2"):
        get_goat_model(model)
    assert not hasattr(model, "goat_state") or model.goat_state is None


def test_injection_refuses_a_zero3_partitioned_weight(process_group, monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    for name, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    weight = model[0].weight
    assert is_zero3_partitioned(weight) and weight.numel() == 0 and weight.ds_shape == (64, 64)
    with pytest.raises(ValueError, match=r"'0' has a sharded weight, a DeepSpeed ZeRO-3 partition .*zero3_init_flag"):
        get_goat_model(model, GoatConfig(target_modules=["0"], modules_to_save=[]))
    assert full_tensor(weight).shape == (64, 64) and weight.numel() == 0  # gathered whole, then released
