"""prepare_for_inference: the residual folded into W0 keeps the outputs (loop reference, greedy tokens), refuses
what needs W0 with a message that says why, and still saves the adapter exactly."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from conftest import reference_goat_forward, svd_residual, tiny_llama, train_like_
from safetensors.torch import load_file
from test_layer import EXPERTS_TOPK, layer_config, make_layer, trained_like
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from goat_hf import (
    GoatConfig,
    decode,
    disable_goat,
    get_goat_model,
    goat_layers,
    load_goat_model,
    prepare_for_inference,
    save_goat_adapter,
    unload_goat,
)
from goat_hf import cpu_kernel as cpu_kernel_module
from goat_hf.adapter_io import restore_goat_weights
from goat_hf.config import INIT_MODES
from goat_hf.prepare import is_prepared

CONFIG = GoatConfig(r=8, num_experts=4, top_k=2)


def prepared_layer_model(layer: nn.Module, cpu_kernel: bool = True) -> nn.Module:
    """A one-layer model with GOAT state around an existing layer, as prepare_for_inference expects a model."""
    holder = nn.Sequential(nn.Linear(layer.in_features, layer.out_features))
    get_goat_model(holder, GoatConfig(r=layer.expert_A.shape[0], num_experts=layer.num_experts, top_k=layer.top_k))
    holder[0] = layer
    return prepare_for_inference(holder, cpu_kernel=cpu_kernel)


def forbid_aten_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if a layer decodes with ATen ops: what runs must be the CPU kernel."""

    def aten_path(*args):
        raise AssertionError("the ATen inference path ran where the CPU kernel should have")

    monkeypatch.setattr(decode, "gated_low_rank", aten_path)


@pytest.mark.parametrize("cpu_kernel", [True, False], ids=["cpu-kernel", "aten-ops"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("num_experts", "top_k"), EXPERTS_TOPK, ids=[f"E{E}-k{k}" for E, k in EXPERTS_TOPK])
@pytest.mark.parametrize("init", INIT_MODES)
def test_prepared_layer_matches_per_expert_reference(init, num_experts, top_k, bias, cpu_kernel, monkeypatch):
    layer = trained_like(make_layer(init, num_experts, top_k, bias=bias))
    x = torch.randn(2, 5, layer.in_features)
    W_res = svd_residual(layer.base_layer.weight, layer_config(init, num_experts, top_k))
    y_ref, _ = reference_goat_forward(layer, x, W_res)
    prepared_layer_model(layer, cpu_kernel)
    torch.testing.assert_close(layer.base_layer.weight, W_res.float())  # folded: the residual is no longer computed
    assert (layer.prepared.kernel is not None) == cpu_kernel, cpu_kernel_module.build_failure()
    if cpu_kernel:
        forbid_aten_path(monkeypatch)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, y_ref.detach().float(), rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())


def test_prepared_half_base_stays_within_half_rounding_of_the_unprepared_layer():
    layer = trained_like(make_layer("goat", 8, 2, torch.bfloat16))
    x = torch.randn(6, layer.in_features).to(torch.bfloat16)
    with torch.no_grad():
        before = layer(x).float()
        prepared_layer_model(layer)
        after = layer(x).float()
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.prepared.extended_weight is None  # [W_res | s·B] in bf16 would round the up-projection
    torch.testing.assert_close(after, before, rtol=2**-6, atol=2**-6 * before.abs().max().item())


def trained_llama() -> nn.Module:
    return train_like_(get_goat_model(tiny_llama(), CONFIG))


def test_prepared_model_keeps_its_greedy_tokens_and_logits(monkeypatch):
    model, prepared = trained_llama(), trained_llama()
    storages = {name: StorageWeakRef(layer.weight.untyped_storage()) for name, layer in goat_layers(prepared).items()}
    prepare_for_inference(prepared)
    gc.collect()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
        forbid_aten_path(monkeypatch)  # the prepared model decodes through the CPU kernel
        torch.testing.assert_close(prepared(ids).logits, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
        assert torch.equal(
            prepared.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0), tokens
        )
    for name, layer in goat_layers(prepared).items():  # W_res replaces W0: no second copy of the base
        weight, extended = layer.base_layer.weight, layer.prepared.extended_weight  # [W_res | s·B] [m, n + r]
        assert storages[name].expired()  # W0's own storage is freed
        assert weight.data_ptr() == extended.data_ptr() and weight.stride() == (extended.shape[1], 1)
        assert extended.shape == (weight.shape[0], weight.shape[1] + layer.expert_A.shape[0])
        torch.testing.assert_close(extended[:, weight.shape[1] :], layer.expert_B * layer.scaling)


def test_prepared_model_refuses_what_needs_W0(tmp_path):
    model = prepare_for_inference(trained_llama())
    for action in (lambda: disable_goat(model).__enter__(), lambda: unload_goat(model)):
        with pytest.raises(RuntimeError, match="prepared for serving.*load_goat_model"):
            action()
    with pytest.raises(RuntimeError, match="holds W_res = W0 - c·s·B0 A0, not the base's W0.*save_goat_adapter"):
        model.save_pretrained(tmp_path / "full")
    assert not (tmp_path / "full" / "model.safetensors").exists()
    model.train()
    with pytest.raises(RuntimeError, match="can neither train nor record routing"):
        model(torch.tensor([[5, 6, 7]]))
    save_goat_adapter(trained_llama(), tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="Loading adapter weights into this model needs the base weights W0"):
        restore_goat_weights(model, tmp_path / "adapter")


def test_prepare_refuses_a_base_that_is_not_a_plain_linear():
    class CustomLinear(nn.Linear):
        pass

    model = get_goat_model(tiny_llama(), CONFIG)
    layer = goat_layers(model)["model.layers.0.mlp.up_proj"]
    old = layer.base_layer
    layer.base_layer = CustomLinear(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj is a CustomLinear.*without preparing"):
        prepare_for_inference(model)
    assert all(layer.prepared is None for layer in goat_layers(model).values())  # checked before anything changed


def test_a_model_made_under_inference_mode_is_prepared_inside_one():
    """Its weights are inference tensors, which torch changes in place only under inference_mode: outside, the first
    layer's fold failed after the model was marked prepared (a second call then did nothing). Refused before anything
    changes, with the fix; inside, the prepared model keeps the unprepared one's logits."""
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = trained_llama()(ids).logits
    with torch.inference_mode():
        model = trained_llama()
    with pytest.raises(ValueError, match=r"made under torch.inference_mode.*with torch.inference_mode\(\): prepare"):
        prepare_for_inference(model)
    assert not is_prepared(model) and all(layer.prepared is None for layer in goat_layers(model).values())
    with torch.inference_mode():
        prepare_for_inference(model)
        assert is_prepared(model)
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())


def test_prepared_model_saves_its_adapter_exactly(tmp_path):
    model = trained_llama()
    save_goat_adapter(model, tmp_path / "before")
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    prepare_for_inference(model)
    save_goat_adapter(model, tmp_path / "after")
    before, after = (
        load_file(tmp_path / "before" / "goat_adapter.safetensors"),
        load_file(tmp_path / "after" / "goat_adapter.safetensors"),
    )
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    records = [json.loads((tmp_path / f / "goat_config.json").read_text())["base_tensors"] for f in ("before", "after")]
    assert records[0] == records[1]  # the fingerprint of W0, not of the folded W_res
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    reloaded = load_goat_model(tmp_path / "after", base_model=base).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
