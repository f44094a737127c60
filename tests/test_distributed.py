"""goat_hf.distributed on real sharded tensors in a 1-process gloo group: DTensors and ZeRO-3 parameters.

The 2-process gathering itself is tested end to end in test_fsdp2.py and test_deepspeed.py.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_llama
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from goat_hf import GoatAdapterError, GoatConfig, get_goat_model, save_goat_adapter
from goat_hf.adapter_io import CONFIG_NAME, restore_goat_weights
from goat_hf.distributed import copy_full_, full_tensor, is_zero3_partitioned, live_tensors


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
    # zero.Init swaps F.linear for its ZeRO-3 wrapper and leaves it swapped after the block: later tests in this
    # process (bf16 layer bounds) would run through it
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    weight = model[0].weight
    assert is_zero3_partitioned(weight) and weight.numel() == 0 and weight.ds_shape == (64, 64)
    with pytest.raises(ValueError, match=r"'0' has a sharded weight, a DeepSpeed ZeRO-3 partition .*zero3_init_flag"):
        get_goat_model(model, GoatConfig(target_modules=["0"], modules_to_save=[]))
    assert full_tensor(weight).shape == (64, 64) and weight.numel() == 0  # gathered whole, then released


def shard_every_parameter(model: nn.Module, mesh) -> None:
    """Every parameter a DTensor sharded by rows, as FSDP2's fully_shard leaves them."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.detach(), mesh, [Shard(0)])
            setattr(module, name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def test_base_fingerprints_of_dtensors_are_those_of_the_whole_tensors(process_group, tmp_path):
    model = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=4, top_k=2))
    save_goat_adapter(model, tmp_path / "plain")
    shard_every_parameter(model, process_group)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer.weight, DTensor)

    save_goat_adapter(model, tmp_path / "sharded")
    plain, sharded = (json.loads((tmp_path / run / CONFIG_NAME).read_text()) for run in ("plain", "sharded"))
    assert sharded["base_tensors"].keys() == plain["base_tensors"].keys()
    for name, record in plain["base_tensors"].items():
        assert sharded["base_tensors"][name]["shape"] == record["shape"], name
        assert sharded["base_tensors"][name]["fingerprint"] == pytest.approx(record["fingerprint"], rel=1e-6), name
    restore_goat_weights(model, tmp_path / "plain")  # the check at load reads the sharded base too

    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.base_layer.weight.add_(0.01)
    with pytest.raises(GoatAdapterError, match=r"'model.layers.1.mlp.down_proj.weight' has other values"):
        restore_goat_weights(model, tmp_path / "plain")


def test_live_tensors_after_an_evaluation_forward_under_fsdp2_are_the_resharded_ones(process_group, tmp_path):
    """FSDP2 leaves the root module unsharded after a forward without backward (an evaluation); state_dict()'s
    pre-hook reshards it and frees the unsharded storage. Read before that hook, the tensors were freed ones and
    fingerprinting them for a checkpoint crashed the process (SIGSEGV)."""
    from torch.distributed.fsdp import fully_shard

    model = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=4, top_k=2))
    save_goat_adapter(model, tmp_path / "before")
    for layer in model.model.layers:
        fully_shard(layer, mesh=process_group)
    fully_shard(model, mesh=process_group)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert not isinstance(model.lm_head.weight, DTensor)  # the root stayed unsharded: the case under test

    tensors = live_tensors(model)
    for name, tensor in tensors.items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        assert local.untyped_storage().nbytes() >= local.numel() * local.element_size(), name
    save_goat_adapter(model, tmp_path / "after")  # fingerprints every base tensor
    before, after = (json.loads((tmp_path / run / CONFIG_NAME).read_text()) for run in ("before", "after"))
    assert after["base_tensors"] == before["base_tensors"]
