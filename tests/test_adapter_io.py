"""adapter_io.py: save -> load bit-exact without an SVD, the files written, and every refusal."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import forbid_svd, perturb_, tiny_classifier, tiny_llama, token_batch, train_like_
from safetensors.torch import load_file

from goat_hf import (
    GoatAdapterError,
    GoatConfig,
    get_goat_model,
    goat_layers,
    load_goat_adapter,
    record_routing,
    save_goat_adapter,
    trainable_parameter_counts,
)
from goat_hf.adapter_io import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, restore_goat_weights

SMALL = GoatConfig(r=16, num_experts=8, top_k=2)


def trained(model: torch.nn.Module, config: GoatConfig = SMALL) -> torch.nn.Module:
    """Inject, then move experts, routers and the head away from their init, as training would."""
    return train_like_(get_goat_model(model, config))


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("init", ["goat", "random", "zero"])
def test_save_load_llama_is_bit_exact_without_svd(tmp_path, init, monkeypatch):
    config = GoatConfig(r=16, num_experts=8, top_k=2, init=init, lora_dropout=0.05)
    model = trained(tiny_llama(seed=0), config)
    batch = token_batch()
    expected = logits(model, batch)
    folder = save_goat_adapter(model, tmp_path / "adapter")

    forbid_svd(monkeypatch)
    with pytest.raises(AssertionError, match="must not compute an SVD"):  # the patch is in place
        get_goat_model(tiny_llama(seed=0), config if init != "zero" else SMALL)
    fresh = tiny_llama(seed=0)
    assert load_goat_adapter(fresh, folder) is fresh
    assert torch.equal(logits(fresh, batch), expected)
    assert fresh.goat_state.config == config
    assert not any(m.training for m in fresh.modules())  # an eval model stays in eval: no adapter dropout
    assert torch.equal(logits(fresh, batch), expected)
    assert trainable_parameter_counts(fresh) == trainable_parameter_counts(model)
    for name, layer in goat_layers(model).items():
        loaded = goat_layers(fresh)[name]
        assert loaded.scaling == layer.scaling and loaded.init_cof == layer.init_cof
        assert loaded.state_dict().keys() == layer.state_dict().keys()
        for key, value in layer.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), f"{name}.{key}"
    with torch.no_grad(), record_routing(fresh), record_routing(model):  # the balance-loss mask hook is back too
        fresh(**batch)
        model(**batch)
    for name, layer in goat_layers(model).items():
        assert torch.equal(goat_layers(fresh)[name].routing.balance_loss, layer.routing.balance_loss)


@pytest.mark.parametrize(("kind", "num_labels"), [("bert", 2), ("roberta", 3)])
def test_save_load_classifier_with_trained_head(tmp_path, kind, num_labels, monkeypatch):
    model = trained(tiny_classifier(kind, num_labels, seed=0))
    batch = token_batch()
    expected = logits(model, batch)
    folder = save_goat_adapter(model, tmp_path / "adapter")

    forbid_svd(monkeypatch)
    fresh = tiny_classifier(kind, num_labels, seed=0)
    assert not torch.equal(
        fresh.classifier.state_dict()["out_proj.weight" if kind == "roberta" else "weight"],
        model.classifier.state_dict()["out_proj.weight" if kind == "roberta" else "weight"],
    )
    load_goat_adapter(fresh, folder)
    assert torch.equal(logits(fresh, batch), expected)
    for name, value in model.classifier.state_dict().items():
        assert torch.equal(fresh.classifier.state_dict()[name], value)
    assert fresh.goat_state.modules_to_save == ["classifier"]
    assert all(p.requires_grad for p in fresh.classifier.parameters())


def test_restoring_an_adapter_under_inference_mode_reaches_the_next_output(tmp_path):
    """Weights made under torch.inference_mode have no version counter for the folded-weights cache to see an in-place
    copy by: restore_goat_weights must drop the layers' caches itself, or the next outputs are the old adapter's."""
    saved = trained(tiny_llama())
    save_goat_adapter(saved, tmp_path / "adapter")
    batch = token_batch()
    with torch.inference_mode():
        model = get_goat_model(tiny_llama(), SMALL).eval()
        before = model(**batch).logits  # caches the fresh adapter's folded weights
        restore_goat_weights(model, tmp_path / "adapter")
        after = model(**batch).logits
    expected = logits(saved.eval(), batch)
    assert not torch.allclose(before, expected, atol=1e-4)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_adapter_files(tmp_path):
    model = trained(tiny_classifier("bert", seed=0))
    folder = save_goat_adapter(model, tmp_path / "nested" / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["config"] == SMALL.to_dict()
    assert meta["modules_to_save"] == ["classifier"]
    assert meta["base_model"]["architecture"] == "BertForSequenceClassification"
    assert meta["base_model"]["model_type"] == "bert"
    layer = meta["layers"]["bert.encoder.layer.0.intermediate.dense"]
    assert (layer["in_features"], layer["out_features"], layer["residual"]) == (64, 128, True)
    assert set(layer) == {"in_features", "out_features", "scaling", "residual"}
    assert meta["base_tensors"]["bert.encoder.layer.0.intermediate.dense.weight"]["shape"] == [128, 64]
    assert "bert.embeddings.word_embeddings.weight" in meta["base_tensors"]  # not only the adapted Linears
    assert not any(name.startswith("classifier.") for name in meta["base_tensors"])  # the head is in the file
    tensors = load_file(folder / WEIGHTS_NAME)
    name = "bert.encoder.layer.0.intermediate.dense"
    assert {k.removeprefix(name + ".") for k in tensors if k.startswith(name + ".")} == {
        "expert_A",
        "expert_B",
        "router.weight",
        "residual_A",
        "residual_B",
    }
    assert {"classifier.weight", "classifier.bias"} <= set(tensors)
    assert not any("base_layer" in k for k in tensors)  # W0 is not saved
    assert tensors[f"{name}.expert_A"].shape == (16, 64) and tensors[f"{name}.expert_B"].shape == (128, 16)


def test_zero_init_saves_no_residual(tmp_path):
    model = trained(tiny_llama(), GoatConfig(r=8, num_experts=2, init="zero"))
    tensors = load_file(save_goat_adapter(model, tmp_path) / WEIGHTS_NAME)
    assert not any("residual" in k for k in tensors)


def test_saving_twice_overwrites(tmp_path):
    model = trained(tiny_llama())
    save_goat_adapter(model, tmp_path)
    perturb_(goat_layers(model)["model.layers.0.mlp.up_proj"].expert_B, seed=3)
    save_goat_adapter(model, tmp_path)
    fresh = load_goat_adapter(tiny_llama(), tmp_path)
    batch = token_batch()
    assert torch.equal(logits(fresh, batch), logits(model, batch))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_wrong_base_weights_are_refused(tmp_path):
    folder = save_goat_adapter(trained(tiny_llama(seed=0)), tmp_path)
    other = tiny_llama(seed=1)
    with pytest.raises(
        GoatAdapterError,
        match=r"Base tensor 'model\.embed_tokens\.weight' \(and 15 more\) has other values than "
        r"the base this adapter was trained on \(the adapter was made for LlamaForCausalLM\)",
    ):
        load_goat_adapter(other, folder)
    assert not goat_layers(other) and not hasattr(other, "goat_state")


def test_wrong_base_shapes_are_refused(tmp_path):
    folder = save_goat_adapter(trained(tiny_llama(seed=0)), tmp_path)
    other = tiny_llama(seed=0, hidden_size=32)
    with pytest.raises(
        GoatAdapterError,
        match=r"Layer 'model\.layers\.0\.self_attn\.q_proj' has shape \(32, 32\) "
        r"here but \(64, 64\) in the adapter; the adapter was made for "
        "LlamaForCausalLM",
    ):
        load_goat_adapter(other, folder)
    assert not goat_layers(other)


def test_wrong_architecture_is_refused(tmp_path):
    folder = save_goat_adapter(trained(tiny_llama(seed=0)), tmp_path)
    with pytest.raises(
        GoatAdapterError,
        match=r"Adapter layer 'model\.layers\.0\.self_attn\.q_proj' is not an "
        r"nn\.Linear of this model; the adapter was made for LlamaForCausalLM",
    ):
        load_goat_adapter(tiny_classifier("bert"), folder)


def test_bf16_copy_of_the_same_base_is_accepted(tmp_path):
    folder = save_goat_adapter(trained(tiny_llama(seed=0)), tmp_path)
    model = load_goat_adapter(tiny_llama(seed=0).to(torch.bfloat16), folder)
    assert len(goat_layers(model)) == 14
    assert all(layer.expert_A.dtype == torch.float32 for layer in goat_layers(model).values())


def test_loading_onto_a_model_with_goat_layers_is_refused(tmp_path):
    folder = save_goat_adapter(trained(tiny_llama(seed=0)), tmp_path)
    model = get_goat_model(tiny_llama(seed=0), SMALL)
    with pytest.raises(ValueError, match=r"already has GOAT layers; unload_goat\(model\) first"):
        load_goat_adapter(model, folder)


def test_saving_a_model_without_goat_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"has no GOAT layers; call get_goat_model"):
        save_goat_adapter(tiny_llama(), tmp_path)


@pytest.fixture
def saved(tmp_path):
    return save_goat_adapter(trained(tiny_llama(seed=0)), tmp_path / "adapter")


def test_truncated_weights_are_refused(saved):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        GoatAdapterError,
        match=r"goat_adapter\.safetensors is not a readable safetensors file, "
        "probably truncated or corrupt",
    ):
        load_goat_adapter(tiny_llama(seed=0), saved)


def test_truncated_header_is_refused(saved):
    (saved / WEIGHTS_NAME).write_bytes((saved / WEIGHTS_NAME).read_bytes()[:20])
    with pytest.raises(GoatAdapterError, match="not a readable safetensors file"):
        load_goat_adapter(tiny_llama(seed=0), saved)


def test_missing_weights_are_refused(saved):
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(
        GoatAdapterError,
        match=r"goat_adapter\.safetensors is missing; the adapter folder is "
        "incomplete",
    ):
        load_goat_adapter(tiny_llama(seed=0), saved)


def test_missing_config_is_refused(saved, tmp_path):
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(GoatAdapterError, match=r"is not a GOAT adapter folder: goat_config\.json is missing"):
        load_goat_adapter(tiny_llama(seed=0), saved)
    with pytest.raises(GoatAdapterError, match="goat_config.json is missing"):
        load_goat_adapter(tiny_llama(seed=0), tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format_version": 2, "config": {', r"goat_config\.json is corrupt \(Expecting"),
        ("[1, 2]", r"goat_config\.json is corrupt: it holds a JSON list, not an object"),
        ('{"config": {}}', r"goat_config\.json is corrupt: field 'format_version' is missing"),
    ],
    ids=["bad-syntax", "not-an-object", "no-version"],
)
def test_corrupt_config_is_refused(saved, text, message):
    (saved / CONFIG_NAME).write_text(text)
    with pytest.raises(GoatAdapterError, match=message + r".*[Ss]ave or download the adapter again"):
        load_goat_adapter(tiny_llama(seed=0), saved)


def test_newer_format_version_is_refused(saved):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (saved / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(
        GoatAdapterError,
        match=rf"has adapter format version {FORMAT_VERSION + 1}, newer than this "
        rf"goat_hf .* reads \(<= {FORMAT_VERSION}\); upgrade goat_hf",
    ):
        load_goat_adapter(tiny_llama(seed=0), saved)


def test_config_fields_from_a_newer_goat_hf_are_refused(saved):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    meta["config"]["shared_experts"] = 1
    (saved / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unknown fields \['shared_experts'\].*Upgrade goat_hf"):
        load_goat_adapter(tiny_llama(seed=0), saved)


def test_weights_that_do_not_match_the_config_are_refused(saved, tmp_path):
    other = save_goat_adapter(trained(tiny_llama(seed=0), GoatConfig(r=8, num_experts=2)), tmp_path / "other")
    (saved / WEIGHTS_NAME).write_bytes((other / WEIGHTS_NAME).read_bytes())
    with pytest.raises(GoatAdapterError, match="is incomplete: goat_adapter.safetensors comes from another save"):
        load_goat_adapter(tiny_llama(seed=0), saved)
    meta = json.loads((saved / CONFIG_NAME).read_text())  # a config edited to vouch for the other weights
    other_meta = json.loads((other / CONFIG_NAME).read_text())
    meta["save_id"], meta["weights_sha256"] = other_meta["save_id"], other_meta["weights_sha256"]
    (saved / CONFIG_NAME).write_text(json.dumps(meta))
    message = (
        r"goat_adapter\.safetensors does not match its goat_config\.json: "
        r"'model\.layers\.0\.self_attn\.q_proj\.expert_A' is of shape \(8, 64\), expected \(16, 64\)"
    )
    with pytest.raises(GoatAdapterError, match=message):
        load_goat_adapter(tiny_llama(seed=0), saved)
