"""Injection into models loaded the big-model ways: device_map, low_cpu_mem_usage, the meta device, offloading.

Each works (the same GOAT layers as on a model built in memory) or refuses, before changing the model, with a
message that says what to do.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from conftest import tiny_llama, token_batch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from goat_hf import GoatConfig, get_goat_model, goat_layers

CONFIG = GoatConfig(r=16, num_experts=8, top_k=2)
META_ERROR = r"has its weight on the meta device .* Materialise the weights first with model\.to_empty\(device='cpu'\)"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(seed=0).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def expected() -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """GOAT layers (state dicts) and logits of the model built in memory: what every loading path must give."""
    model = get_goat_model(tiny_llama(seed=0), CONFIG)
    layers = {name: {k: v.clone() for k, v in layer.state_dict().items()} for name, layer in goat_layers(model).items()}
    with torch.no_grad():
        return layers, model(**token_batch()).logits


def assert_same_goat(model: torch.nn.Module, expected) -> None:
    layers, logits = expected
    assert goat_layers(model).keys() == layers.keys()
    for name, layer in goat_layers(model).items():
        for key, value in layer.state_dict().items():
            assert torch.equal(value, layers[name][key]), f"{name}.{key}"
    with torch.no_grad():
        assert torch.equal(model(**token_batch()).logits, logits)


@pytest.mark.parametrize(
    "load_options",
    [dict(device_map="cpu"), dict(device_map="auto"), dict(low_cpu_mem_usage=True)],
    ids=["device_map=cpu", "device_map=auto", "low_cpu_mem_usage"],
)
def test_injection_into_a_model_loaded_for_big_models(checkpoint, expected, load_options):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **load_options).eval()
    assert_same_goat(get_goat_model(model, CONFIG), expected)


def snapshot(model: torch.nn.Module) -> tuple[dict, dict]:
    return {k: (v.device, v.dtype, v.shape) for k, v in model.state_dict().items()}, {
        n: p.requires_grad for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("build", ["init_empty_weights", "torch.device('meta')"])
def test_a_meta_model_is_refused_then_works_once_materialised(expected, build):
    config = tiny_llama(seed=0).config
    if build == "init_empty_weights":
        with init_empty_weights():
            model = LlamaForCausalLM(config)
    else:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Layer 'model\.layers\.0\.self_attn\.q_proj' " + META_ERROR):
        get_goat_model(model, CONFIG)
    assert not goat_layers(model) and not hasattr(model, "goat_state") and snapshot(model) == before

    model.to_empty(device="cpu")  # what the message says to do
    model.load_state_dict(tiny_llama(seed=0).state_dict())
    model.model.rotary_emb.__init__(config)  # non-persistent buffers are not in the state dict
    assert_same_goat(get_goat_model(model.eval(), CONFIG), expected)


def test_a_model_with_offloaded_layers_is_refused(checkpoint, tmp_path):
    """Layers a device_map sends to disk (or CPU, next to a GPU) keep meta weights and load them per forward."""
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map |= {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device_map, offload_folder=tmp_path)
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"'model\.layers\.1\.self_attn\.q_proj' .*offloaded to 'disk' or CPU.*"
        r"load with a device_map that keeps every layer on a device",
    ):
        get_goat_model(model, CONFIG)
    assert not goat_layers(model) and snapshot(model) == before
