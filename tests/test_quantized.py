"""GOAT over bitsandbytes 4-bit (NF4, FP4; double quantisation on/off) and 8-bit bases (QLoRA-style), on CPU.

Covers base_weights.py (the dense W0 of each layer type, the CPU repacking trap, the refusal of other quantized
layers) and injection, training, save/load and unload over a quantized base.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, token_batch, train_like_
from safetensors.torch import load_file
from torch import nn

from goat_hf import (
    GoatConfig,
    get_goat_model,
    goat_layers,
    load_goat_adapter,
    save_goat_adapter,
    unload_goat,
)
from goat_hf.base_weights import dense_weight, fingerprint_weight, was_repacked

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

CONFIG = GoatConfig(r=16, num_experts=8, top_k=2)
QUANTIZATIONS = {
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
}
FOUR_BIT = [kind for kind in QUANTIZATIONS if kind != "int8"]
TRAINED_KINDS = ["nf4-double", "fp4", "int8"]  # NF4, FP4, 8-bit, and double quantisation on and off
LAYER = "model.layers.0.mlp.down_proj"  # 128 -> 64: not square, so a transposed reading would show


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(seed=0).save_pretrained(folder)
    return str(folder)


def quantized(checkpoint: str, kind: str) -> nn.Module:
    """A freshly quantized tiny Llama, as transformers loads a QLoRA base (fp32 compute, on the CPU)."""
    options = dict(QUANTIZATIONS[kind])
    if "load_in_4bit" in options:
        options["bnb_4bit_compute_dtype"] = torch.float32
    config = BitsAndBytesConfig(**options)
    return AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=config, device_map="cpu").eval()


def logits(model: nn.Module) -> torch.Tensor:
    """Logits without the CPU repacking (train mode; these models have no dropout), in the model's own mode after."""
    training = model.training
    model.train()
    with torch.no_grad():
        out = model(**token_batch()).logits
    model.train(training)
    return out


def eval_forward(model: nn.Module) -> torch.Tensor:
    """What generate() or an evaluation loop does: eval mode, no gradients (this repacks 4-bit layers on CPU)."""
    model.eval()
    with torch.no_grad():
        return model(**token_batch()).logits


def require_cpu_repacking(layer: nn.Module) -> None:
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack 4-bit weights here")


def snapshot(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that holds a quantized layer's W0 (codes, scales), cloned."""
    tensors = {"data": layer.weight.data.clone()}
    state = getattr(layer.weight, "quant_state", None)
    if state is not None:
        tensors.update({key: value.clone() for key, value in state.as_dict(packed=True).items()})
    scales = getattr(layer.weight, "SCB", None)
    scales = scales if scales is not None else getattr(getattr(layer, "state", None), "SCB", None)
    if scales is not None:
        tensors["SCB"] = scales.clone()
    return tensors


def same_snapshot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# ---- the dense weight ----


@pytest.mark.parametrize("kind", FOUR_BIT)
def test_4bit_dense_weight_is_what_the_layer_computes_with(checkpoint, kind):
    model, original = quantized(checkpoint, kind), tiny_llama(seed=0)
    layer = model.get_submodule(LAYER)
    before = snapshot(layer)
    W = dense_weight(layer)
    assert W.dtype == torch.float32 and W.shape == (64, 128)
    model.train()  # the standard (not repacked) kernel: dequantize, then an fp32 matmul
    assert torch.equal(W, layer(torch.eye(128)).detach().T)
    W_fp32 = original.get_submodule(LAYER).weight
    assert (W - W_fp32).abs().max() < 0.25 * W_fp32.abs().max()  # a 4-bit rounding of the right matrix
    assert not torch.allclose(W, W_fp32, atol=1e-4)  # and not the fp32 original
    assert same_snapshot(snapshot(layer), before)  # reading W0 changes nothing


@pytest.mark.parametrize("kind", FOUR_BIT)
def test_4bit_dense_weight_after_the_cpu_repacking(checkpoint, kind):
    model = quantized(checkpoint, kind)
    layer = model.get_submodule(LAYER)
    require_cpu_repacking(layer)
    W, W_fingerprint = dense_weight(layer), fingerprint_weight(layer)
    eval_forward(model)
    assert was_repacked(layer)
    garbage = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert garbage.shape != W.shape or (garbage.float() - W).abs().max() > 0.05  # the trap: the plain read is wrong
    W_repacked = dense_weight(layer)
    # the repacking rounds the block scales to bf16, exactly what fingerprint_weight reads on the fresh layer
    assert torch.equal(W_repacked, W_fingerprint)
    assert torch.allclose(W_repacked, W, rtol=2**-8, atol=0) and not torch.equal(W_repacked, W)
    with torch.no_grad():  # the repacked bf16 kernel itself (its products are rounded to bf16)
        kernel = layer(torch.eye(128)).float().T
    assert torch.allclose(kernel, W_repacked, rtol=2**-7, atol=1e-7)
    assert torch.equal(fingerprint_weight(layer), W_fingerprint)


def test_8bit_dense_weight_before_and_after_the_first_forward(checkpoint):
    model, original = quantized(checkpoint, "int8"), tiny_llama(seed=0)
    layer = model.get_submodule(LAYER)
    codes, scales = layer.weight.data.clone(), layer.weight.SCB.clone()
    by_hand = codes.float() * scales[:, None] / 127  # LLM.int8 row-wise absmax quantisation
    W = dense_weight(layer)
    assert torch.allclose(W, by_hand, rtol=1e-6, atol=0)
    W_fp32 = original.get_submodule(LAYER).weight
    assert (W - W_fp32).abs().max() <= scales.max() / 127  # within one int8 step of the fp32 original
    eval_forward(model)
    assert layer.weight.SCB is None  # the scales moved to the layer's state
    assert torch.equal(dense_weight(layer), W)


# ---- injection, training, save/load, unload ----


@pytest.mark.parametrize("kind", TRAINED_KINDS)
def test_goat_over_a_quantized_base(checkpoint, kind, tmp_path):
    model = quantized(checkpoint, kind)
    batch = token_batch()
    expected_base = logits(model)
    bases = {name: m for name, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    snapshots = {name: snapshot(m) for name, m in bases.items()}
    dense = {name: dense_weight(m) for name, m in bases.items()}

    get_goat_model(model, CONFIG)
    layers = goat_layers(model)
    assert layers.keys() == bases.keys()
    E, d, rho = CONFIG.num_experts, CONFIG.expert_rank, CONFIG.rho
    for name, layer in layers.items():  # the experts are SVD segments of the dequantized weight
        assert layer.base_layer is bases[name]
        U, S, Vh = torch.linalg.svd(dense[name].double(), full_matrices=False)
        t = S.numel() // E
        index = torch.cat([torch.arange(j * t, j * t + d) for j in range(E)])
        segments = U[:, index] @ torch.diag(S[index]) @ Vh[index] / rho  # sum_j U_j S_j V_j^T / rho
        product = layer.scaling * layer.residual_B.double() @ layer.residual_A.double()
        assert torch.allclose(product, segments, atol=1e-5 * S[0].item()), name

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=batch["input_ids"]).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[3] < losses[0] - 0.05, losses  # 3 optimizer steps lower the loss on the fixed batch
    for name, base in bases.items():  # W0 stays quantized and untouched
        assert not base.weight.requires_grad
        assert same_snapshot(snapshot(base), snapshots[name]), name

    trained = logits(model)
    folder = save_goat_adapter(model, tmp_path / "adapter")
    fresh = quantized(checkpoint, kind)
    load_goat_adapter(fresh, folder)
    assert torch.equal(logits(fresh), trained)

    unload_goat(model)
    for name, base in bases.items():
        assert model.get_submodule(name) is base and type(base) is type(bases[name])
        assert same_snapshot(snapshot(base), snapshots[name]), name
    assert torch.equal(logits(model), expected_base)


def layer0_expert_gradients(model: nn.Module) -> torch.Tensor:
    """Gradient of the loss w.r.t. the first layer's q_proj experts: it must pass through every base layer above."""
    model.train()
    batch = token_batch()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return goat_layers(model)["model.layers.0.self_attn.q_proj"].expert_B.grad.clone()


def dense_twin(model: nn.Module) -> nn.Module:
    """The fp32 tiny Llama with each quantized layer's weight replaced by its dense W0 (read before injection)."""
    twin = tiny_llama(seed=0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                twin.get_submodule(name).weight.copy_(dense_weight(module))
    return twin


def test_a_base_repacked_before_injection_is_trained_correctly(checkpoint, tmp_path, caplog):
    model = quantized(checkpoint, "nf4-double")
    require_cpu_repacking(model.get_submodule(LAYER))
    eval_forward(model)  # e.g. a generate() to try the model out, before training
    assert was_repacked(model.get_submodule(LAYER))
    expected = layer0_expert_gradients(get_goat_model(dense_twin(model), CONFIG))
    with caplog.at_level(logging.WARNING, logger="goat_hf.model"):
        get_goat_model(model, CONFIG)
    assert "had been repacked by bitsandbytes" in caplog.text and LAYER in caplog.text
    assert not any(was_repacked(layer.base_layer) for layer in goat_layers(model).values())
    # A repacked layer passes no gradient to its input: the base paths of every layer above would drop out.
    assert torch.allclose(layer0_expert_gradients(model), expected, rtol=1e-4, atol=1e-6 * expected.abs().max())

    train_like_(model)  # the adapter now moves the logits well beyond any rounding
    folder = save_goat_adapter(model, tmp_path / "adapter")  # fingerprinted with bf16 scales either way
    fresh = quantized(checkpoint, "nf4-double")
    load_goat_adapter(fresh, folder)
    assert torch.equal(logits(fresh), logits(model))  # every saved tensor, the residual included, is back


def test_goat_keeps_4bit_bases_out_of_the_cpu_repacking_and_unload_gives_it_back(checkpoint, tmp_path):
    model = quantized(checkpoint, "nf4")
    require_cpu_repacking(model.get_submodule(LAYER))
    get_goat_model(model, CONFIG)
    base = model.get_submodule(LAYER).base_layer
    before = snapshot(base)
    gradients = layer0_expert_gradients(model)
    model.zero_grad()
    eval_forward(model)  # an evaluation between training steps
    assert not was_repacked(base) and same_snapshot(snapshot(base), before)
    assert torch.equal(layer0_expert_gradients(model), gradients)
    folder = save_goat_adapter(model, tmp_path / "adapter")
    load_goat_adapter(quantized(checkpoint, "nf4"), folder)  # the fingerprint still matches a fresh base

    unload_goat(model)
    eval_forward(model)
    assert was_repacked(model.get_submodule(LAYER))  # its own setting is back: bitsandbytes repacks it again


def test_trainer_accepts_a_quantized_base_with_goat_layers(checkpoint, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from goat_hf import GoatTrainer

    model = quantized(checkpoint, "nf4-double")
    batch = token_batch(4, 8)
    data = Dataset.from_dict({"input_ids": batch["input_ids"].tolist(), "labels": batch["input_ids"].tolist()})
    args = TrainingArguments(tmp_path / "out", max_steps=2, report_to=[], use_cpu=True, save_strategy="no")
    trainer = GoatTrainer(model=model, args=args, train_dataset=data, goat_config=CONFIG)
    before = {name: layer.expert_B.clone() for name, layer in goat_layers(model).items()}
    trainer.train()
    assert all(not torch.equal(layer.expert_B, before[name]) for name, layer in goat_layers(model).items())
    assert not getattr(model, "_hf_peft_config_loaded", False)  # raised only while the Trainer was built


# ---- refusals ----


class QuantLinear(nn.Module):
    """Shaped like auto-gptq's QuantLinear: packed int32 qweight/qzeros, scales, no dense weight."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        groups, packed = in_features // group_size, 32 // bits  # int32 words hold `packed` 4-bit values
        self.register_buffer("qweight", torch.zeros(in_features // packed, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // packed, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(groups, out_features, dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def unchanged(model: nn.Module, state: dict[str, torch.Tensor], trainable: dict[str, bool]) -> bool:
    return (
        not goat_layers(model)
        and not hasattr(model, "goat_state")
        and {n: p.requires_grad for n, p in model.named_parameters()} == trainable
        and all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    )


@pytest.mark.parametrize("target_modules", ["all-linear", ["q_proj", "v_proj"]], ids=["all-linear", "names"])
def test_a_gptq_like_layer_is_refused_before_the_model_changes(target_modules):
    model = tiny_llama(seed=0)
    model.model.layers[1].self_attn.v_proj = QuantLinear(64, 32)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError,
        match=r"Layer 'model\.layers\.1\.self_attn\.v_proj' is a quantized test_quantized\.QuantLinear.*"
        r"Supported layers: nn\.Linear, bitsandbytes Linear4bit \(NF4 or FP4.*\) and Linear8bitLt",
    ):
        get_goat_model(model, GoatConfig(r=16, target_modules=target_modules))
    assert unchanged(model, state, trainable)


def test_a_linear_with_a_non_float_weight_is_refused():
    """torchao-style quantisation keeps an nn.Linear but swaps its weight for an integer or subclass tensor."""
    model = tiny_llama(seed=0)
    proj = model.model.layers[0].mlp.up_proj
    proj.weight = nn.Parameter(torch.zeros_like(proj.weight, dtype=torch.int8), requires_grad=False)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"Layer 'model\.layers\.0\.mlp\.up_proj' is a quantized torch\.nn.*Linear"):
        get_goat_model(model, CONFIG)
    assert unchanged(model, state, trainable)


# ---- the examples' --load_in_4bit ----


def test_sft_example_with_load_in_4bit(tmp_path):
    """--load_in_4bit trains GOAT over an NF4 base; the evaluation before training repacks it on CPU first."""
    from instruct_fixtures import save_tiny_instruct_model
    from test_sft_examples import QUICK, load_example

    model_folder = save_tiny_instruct_model(tmp_path / "tiny")
    out = tmp_path / "out"
    load_example("sft_nlg").main(
        ["--model_name_or_path", str(model_folder), "--output_dir", str(out), "--num_generated_train", "8",
         "--num_generated_eval", "4", "--load_in_4bit", "true", *QUICK]
    )  # fmt: skip
    adapter = json.loads((out / "goat_config.json").read_text())
    record = adapter["base_tensors"]["model.layers.0.self_attn.q_proj.weight"]  # the dense W0, not the packed codes
    assert record["dtype"] == "float32" and record["shape"] == [
        adapter["layers"]["model.layers.0.self_attn.q_proj"]["out_features"],
        adapter["layers"]["model.layers.0.self_attn.q_proj"]["in_features"],
    ]
    saved = load_file(out / "goat_adapter.safetensors")  # TRL casts a quantized model's trainable weights to bf16
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}  # GOAT keeps them fp32
    fresh = AutoModelForCausalLM.from_pretrained(
        model_folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32), device_map="cpu",
    )  # fmt: skip
    load_goat_adapter(fresh, out)  # the fingerprints match a freshly quantized base
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in goat_layers(fresh).values())


def test_load_in_4bit_and_a_quantization_config_conflict():
    from test_sft_examples import load_example

    sys.path.insert(0, str(Path(load_example("sft_nlg").__file__).parent))
    from sft_common import four_bit_options

    options = four_bit_options({"dtype": "float16"}, bf16=False)
    assert options["dtype"] == "float16" and options["device_map"] == {"": "cpu"}
    assert options["quantization_config"].bnb_4bit_use_double_quant
    with pytest.raises(ValueError, match="--load_in_4bit and a quantization_config in --model_init_kwargs"):
        four_bit_options({"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}, bf16=False)
