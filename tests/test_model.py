"""model.py: in-place injection, what is trainable, switching off, unloading, counts, and bad targets."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from conftest import perturb_, tiny_classifier, tiny_llama, token_batch, train_like_
from peft import LoraConfig, get_peft_model
from torch import nn

from goat_hf import (
    GoatConfig,
    GoatLinear,
    disable_goat,
    get_goat_model,
    goat_layers,
    print_trainable_parameters,
    record_routing,
    trainable_parameter_counts,
    unload_goat,
)

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = GoatConfig(r=16, num_experts=8, top_k=2)


def test_injects_in_place_and_keeps_the_transformers_model():
    model = tiny_llama()
    signature, config = inspect.signature(model.forward), model.config
    batch = token_batch()
    returned = get_goat_model(model, SMALL)
    assert returned is model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert inspect.signature(model.forward) == signature
    assert model.config is config and model.generation_config is not None
    assert model.get_output_embeddings() is model.lm_head and type(model.lm_head) is nn.Linear
    layers = goat_layers(model)
    assert sorted(layers) == sorted(
        f"model.layers.{i}.{p}.{n}"
        for i in range(2)
        for p, n in [
            ("self_attn", "q_proj"),
            ("self_attn", "k_proj"),
            ("self_attn", "v_proj"),
            ("self_attn", "o_proj"),
            ("mlp", "gate_proj"),
            ("mlp", "up_proj"),
            ("mlp", "down_proj"),
        ]
    )
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, 7, 100) and torch.isfinite(out.loss)
    generated = model.generate(batch["input_ids"][:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 11)


@pytest.mark.parametrize(("kind", "num_labels"), [("bert", 2), ("roberta", 3)])
def test_only_experts_router_and_task_head_are_trainable(kind, num_labels):
    model = get_goat_model(tiny_classifier(kind, num_labels), SMALL)
    assert model.goat_state.modules_to_save == ["classifier"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    head = {name for name, _ in model.named_parameters() if name.startswith("classifier.")}
    adapters = {
        f"{name}.{tensor}" for name in goat_layers(model) for tensor in ("expert_A", "expert_B", "router.weight")
    }
    assert head and trainable == head | adapters
    assert not any(isinstance(m, GoatLinear) for m in model.classifier.modules())  # the head is trained in full
    assert "bert.pooler.dense" in goat_layers(model) or "roberta.encoder.layer.0.output.dense" in goat_layers(model)

    batch = token_batch()
    out = model(**batch, labels=torch.tensor([0, 1]))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_lm_head_is_never_targeted():
    model = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=2, target_modules=["lm_head", "q_proj"]))
    assert sorted(goat_layers(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad


def test_target_modules_as_suffixes_and_as_regex():
    by_suffix = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=2, target_modules=["v_proj", "mlp.up_proj"]))
    assert sorted(n.split(".", 3)[-1] for n in goat_layers(by_suffix)) == [
        "mlp.up_proj",
        "mlp.up_proj",
        "self_attn.v_proj",
        "self_attn.v_proj",
    ]
    by_regex = get_goat_model(tiny_llama(), GoatConfig(r=8, num_experts=2, target_modules=r"model\.layers\.1\..*_proj"))
    assert sorted(goat_layers(by_regex)) == sorted(
        f"model.layers.1.{p}.{n}"
        for p, n in [
            ("self_attn", "q_proj"),
            ("self_attn", "k_proj"),
            ("self_attn", "v_proj"),
            ("self_attn", "o_proj"),
            ("mlp", "gate_proj"),
            ("mlp", "up_proj"),
            ("mlp", "down_proj"),
        ]
    )


def test_default_config_works():
    model = get_goat_model(tiny_classifier("bert"))
    assert model.goat_state.config == GoatConfig()
    layers = goat_layers(model)
    linears = [n for n, m in tiny_classifier("bert").named_modules() if isinstance(m, nn.Linear) and n != "classifier"]
    assert sorted(layers) == sorted(linears)
    assert all(layer.num_experts == 8 and layer.top_k == 2 and layer.expert_rank == 1 for layer in layers.values())
    out = model(**token_batch(), labels=torch.tensor([1, 0]))
    out.loss.backward()
    assert all(layer.expert_A.grad is not None for layer in layers.values())


def test_injection_is_seeded():
    first = get_goat_model(tiny_llama(), GoatConfig(r=16, num_experts=8, init="random", seed=3))
    second = get_goat_model(tiny_llama(), GoatConfig(r=16, num_experts=8, init="random", seed=3))
    other = get_goat_model(tiny_llama(), GoatConfig(r=16, num_experts=8, init="random", seed=4))
    name = "model.layers.1.mlp.down_proj"
    for tensor in ("expert_A", "expert_B", "router.weight"):
        a, b, c = (goat_layers(m)[name].get_parameter(tensor) for m in (first, second, other))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_disable_goat_gives_the_base_model_exactly():
    batch = token_batch()
    model = tiny_llama()
    with torch.no_grad():
        expected = model(**batch).logits
    get_goat_model(model, SMALL)
    train_like_(model)
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, expected)
        with disable_goat(model) as same:
            assert same is model
            assert torch.equal(model(**batch).logits, expected)
        assert all(layer.adapter_enabled for layer in goat_layers(model).values())
        assert not torch.allclose(model(**batch).logits, expected)


def test_unload_gives_back_the_plain_model():
    model = tiny_classifier("bert")
    model.bert.embeddings.requires_grad_(False)  # a choice of the user's, to be restored
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    batch = token_batch()

    get_goat_model(model, SMALL)
    train_like_(model)  # experts, routers and the head
    trained_head = model.classifier.weight.detach().clone()
    old_layer = goat_layers(model)["bert.pooler.dense"]
    assert unload_goat(model) is model

    assert not goat_layers(model) and not hasattr(model, "goat_state")
    for name, linear in linears.items():
        assert model.get_submodule(name) is linear and type(linear) is nn.Linear
    for name, p in model.named_parameters():
        assert p.requires_grad == requires_grad[name], name
        if not name.startswith("classifier."):
            assert torch.equal(p, weights[name]), name
    assert torch.equal(model.classifier.weight, trained_head)  # the head stays as trained, as PEFT's unload()
    old_layer.token_mask = None
    with torch.no_grad():
        model(**batch)
    assert old_layer.token_mask is None  # the attention-mask hook is gone with the layers
    get_goat_model(model, SMALL)  # can be injected again
    with pytest.raises(ValueError, match="has no GOAT layers; call get_goat_model"):
        unload_goat(unload_goat(model))


def test_injected_layers_follow_the_train_eval_mode():
    """Layers injected into an eval model are in eval mode: no adapter dropout at inference."""
    model = get_goat_model(tiny_llama(), GoatConfig(r=16, num_experts=8, lora_dropout=0.3))
    train_like_(model)
    assert not any(m.training for m in model.modules())
    batch = token_batch()
    with torch.no_grad():
        logits = model(**batch).logits
        assert torch.equal(model(**batch).logits, logits)
        model.train()
        assert all(layer.dropout.training for layer in goat_layers(model).values())
        assert not torch.equal(model(**batch).logits, logits)


def test_trainable_parameter_counts_by_kind(capsys):
    model = get_goat_model(tiny_classifier("bert", num_labels=3), SMALL)
    layers = goat_layers(model).values()
    experts = sum(16 * (layer.in_features + layer.out_features) for layer in layers)
    router = sum(8 * layer.in_features for layer in layers)
    head = 64 * 3 + 3
    total = sum(p.numel() for p in model.parameters())
    counts = trainable_parameter_counts(model)
    assert counts == {
        "experts": experts,
        "router": router,
        "head": head,
        "trainable": experts + router + head,
        "total": total,
    }
    print_trainable_parameters(model)
    printed = capsys.readouterr().out
    assert f"trainable params: {experts + router + head:,}" in printed and f"router {router:,}" in printed
    assert f"all params: {total:,}" in printed


def test_attention_mask_reaches_every_layer():
    """The balance loss of each layer covers the real tokens only (padding excluded through the model's mask)."""
    model = get_goat_model(tiny_llama(), SMALL)
    train_like_(model)
    batch = token_batch()
    real = batch["attention_mask"].reshape(-1).bool()
    with torch.no_grad(), record_routing(model):
        model(**batch)
    for layer in goat_layers(model).values():
        record = layer.routing
        picks = torch.zeros_like(record.probs).scatter_(1, record.top_experts, 1.0)

        def balance(keep, picks=picks, record=record):
            return 8 * (picks[keep].mean(0) * record.probs[keep].mean(0)).sum()

        torch.testing.assert_close(record.balance_loss, balance(real))
        assert not torch.allclose(record.balance_loss, balance(torch.ones_like(real)))
    with torch.no_grad(), record_routing(model):
        model(input_ids=batch["input_ids"])  # no mask: every token counts
    assert all(layer.token_mask is None for layer in goat_layers(model).values())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            GoatConfig(r=72, num_experts=8),
            r"r=72 is larger than min\(in_features, out_features\) of every targeted "
            r"layer \(the largest is 64\); use r <= 64",
        ),
        (
            GoatConfig(target_modules=["qkv"]),
            r"target_modules=\['qkv'\] matches no module of LlamaForCausalLM.*"
            r"named: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
        ),
        (
            GoatConfig(target_modules=["lm_head"]),
            r"matches no module of LlamaForCausalLM \(the task head and output "
            "embeddings are never targets",
        ),
        (GoatConfig(target_modules=["mlp"]), r"matches 'model.layers.0.mlp', a LlamaMLP, not an nn.Linear"),
        (GoatConfig(target_modules=r"model\.norm"), r"a LlamaRMSNorm, not an nn.Linear"),
        (GoatConfig(modules_to_save=["head"]), r"modules_to_save entry 'head' matches no module of LlamaForCausalLM"),
    ],
    ids=["r-too-large", "no-match", "lm-head-only", "not-linear", "not-linear-regex", "unknown-head"],
)
def test_bad_targets_are_refused(config, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        get_goat_model(model, config)
    assert not goat_layers(model) and not hasattr(model, "goat_state")


def test_injecting_twice_is_refused():
    model = get_goat_model(tiny_llama(), SMALL)
    with pytest.raises(ValueError, match=r"already has GOAT layers; unload_goat\(model\) first"):
        get_goat_model(model, SMALL)


def test_layers_smaller_than_r_are_skipped_with_a_log_line(caplog):
    model = tiny_llama()  # k_proj and v_proj are 64 -> 32
    with caplog.at_level(logging.WARNING, logger="goat_hf"):
        get_goat_model(model, GoatConfig(r=40, num_experts=8))
    skipped = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")]
    assert not set(skipped) & set(goat_layers(model))
    assert len(goat_layers(model)) == 10
    (record,) = [r for r in caplog.records if "skips" in r.getMessage()]
    assert "4 layer(s) with min(in, out) < r=40" in record.getMessage()
    assert all(name in record.getMessage() for name in skipped)


def test_bf16_model_gets_fp32_adapters():
    model = get_goat_model(tiny_llama().to(torch.bfloat16), SMALL)
    for layer in goat_layers(model).values():
        assert layer.base_layer.weight.dtype == torch.bfloat16
        assert layer.expert_A.dtype == layer.expert_B.dtype == layer.router.weight.dtype == torch.float32
    assert model(**token_batch()).logits.dtype == torch.bfloat16


def test_one_zero_init_expert_with_alpha_scaling_is_peft_lora():
    """E = 1, init "zero", scaling "alpha" is plain LoRA: same outputs and gradients as PEFT given the same weights."""
    r, alpha, targets = 8, 16.0, ["q_proj", "v_proj", "down_proj"]
    lora = get_peft_model(
        tiny_llama(),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=True, lora_dropout=0.0),
    )
    goat = get_goat_model(
        tiny_llama(),
        GoatConfig(r=r, num_experts=1, top_k=1, init="zero", scaling="alpha", lora_alpha=alpha, target_modules=targets),
    )
    layers = goat_layers(goat)
    assert len(layers) == 6
    for name, layer in layers.items():
        peft_layer = lora.base_model.model.get_submodule(name)
        assert layer.scaling == peft_layer.scaling["default"] == alpha / r
        with torch.no_grad():
            perturb_(peft_layer.lora_B["default"].weight, std=0.05, seed=len(name))  # B != 0: LoRA does something
            layer.expert_A.copy_(peft_layer.lora_A["default"].weight)
            layer.expert_B.copy_(peft_layer.lora_B["default"].weight)

    batch = token_batch()
    out_lora = lora(**batch, labels=batch["input_ids"])
    out_goat = goat(**batch, labels=batch["input_ids"])
    with torch.no_grad(), lora.disable_adapter():
        base_logits = lora(**batch).logits
    assert not torch.allclose(out_lora.logits, base_logits, atol=1e-3)
    torch.testing.assert_close(out_goat.logits, out_lora.logits, rtol=1e-5, atol=1e-5)
    out_lora.loss.backward()
    out_goat.loss.backward()
    for name, layer in layers.items():
        peft_layer = lora.base_model.model.get_submodule(name)
        for mine, theirs in [
            (layer.expert_A, peft_layer.lora_A["default"].weight),
            (layer.expert_B, peft_layer.lora_B["default"].weight),
        ]:
            assert theirs.grad.abs().max() > 0
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6 * theirs.grad.abs().max())


def test_a_model_with_goat_layers_pickles_whole(tmp_path):
    """torch.save of the whole model (and a spawned worker's pickle): its padding-mask hook must pickle, and the loaded
    model computes what the saved one did and still hands the mask to its own layers."""
    model = train_like_(get_goat_model(tiny_classifier("bert", seed=0), SMALL)).eval()
    ids, mask = torch.randint(3, 100, (2, 6)), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    loaded(input_ids=ids, attention_mask=mask)  # with gradients: the loaded hook hands the mask to the loaded layers
    assert all(torch.equal(layer.token_mask, mask.float()) for layer in goat_layers(loaded).values())
