"""The padding mask reaches a layer only for inputs of its shape: encoder-decoder, sequence-first, positional mask."""

from __future__ import annotations

import io
from copy import deepcopy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_classifier, train_like_
from torch import nn
from transformers import BartConfig, BartForConditionalGeneration

from goat_hf import GoatConfig, get_goat_model, goat_layers, record_routing
from goat_hf.model import TokenMaskHook

CONFIG = GoatConfig(r=8, num_experts=4, top_k=2)


def formula_balance_loss(layer, x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """E * sum_j f_j P_j from the layer's input and router weight alone, over the tokens where `real` is 1."""
    tokens = x.reshape(-1, layer.in_features).double()
    probs = F.softmax(tokens @ layer.router.weight.double().T, dim=-1)  # [T, E]
    picks = torch.zeros_like(probs).scatter_(1, probs.topk(layer.top_k, dim=-1).indices, 1.0)
    w = torch.ones(tokens.shape[0], dtype=torch.float64) if real is None else real.reshape(-1).double()
    f = (picks * w[:, None]).sum(0) / w.sum()
    P = (probs * w[:, None]).sum(0) / w.sum()
    return layer.num_experts * (f * P).sum()


def capture_inputs(model) -> dict[str, torch.Tensor]:
    inputs = {}
    for name, layer in goat_layers(model).items():
        layer.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0].detach()))
    return inputs


def tiny_bart() -> BartForConditionalGeneration:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        dropout=0.0,
    )
    return BartForConditionalGeneration(config).eval()


@pytest.mark.parametrize("with_decoder_mask", [False, True], ids=["no-decoder-mask", "decoder-mask"])
def test_encoder_decoder_with_equal_lengths_masks_each_side_with_its_own_mask(with_decoder_mask):
    model = train_like_(get_goat_model(tiny_bart(), CONFIG))
    inputs = capture_inputs(model)
    source = torch.randint(3, 100, (2, 6))
    source_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])  # padding in the source only
    target = torch.randint(3, 100, (2, 6))  # as long as the source: the element counts match
    target_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]) if with_decoder_mask else None
    with torch.no_grad(), record_routing(model):
        model(
            input_ids=source, attention_mask=source_mask, decoder_input_ids=target, decoder_attention_mask=target_mask
        )
    checked = {"encoder": 0, "decoder": 0}
    for name, layer in goat_layers(model).items():
        if ".encoder_attn.k_proj" in name or ".encoder_attn.v_proj" in name:
            continue  # the decoder's view of the encoder states: no mask of that side is handed to the decoder
        side = "encoder" if ".encoder." in name else "decoder"
        real = source_mask if side == "encoder" else target_mask
        expected = formula_balance_loss(layer, inputs[name], real)
        torch.testing.assert_close(layer.routing.balance_loss.double(), expected, rtol=1e-5, atol=1e-6, msg=name)
        if side == "decoder" and real is None:  # the source mask would have changed it: the test can fail
            assert not torch.allclose(expected, formula_balance_loss(layer, inputs[name], source_mask))
        checked[side] += 1
    assert checked["encoder"] >= 6 and checked["decoder"] >= 6


class SequenceFirst(nn.Module):
    """A model whose activations are [S, B, n] (as torch.nn.Transformer without batch_first) and mask [B, S]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 32)
        self.proj = nn.Linear(32, 32)
        self.classifier = nn.Linear(32, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids).transpose(0, 1)  # [S, B, n]
        return self.classifier(self.proj(hidden).mean(0))


@pytest.mark.parametrize("positional", [False, True], ids=["keyword-mask", "positional-mask"])
def test_sequence_first_activations_get_the_transposed_mask(positional):
    model = train_like_(get_goat_model(SequenceFirst(), GoatConfig(r=8, num_experts=4, target_modules=["proj"])))
    inputs = capture_inputs(model)
    ids = torch.randint(3, 100, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    with torch.no_grad(), record_routing(model):
        model(ids, mask) if positional else model(ids, attention_mask=mask)
    layer = goat_layers(model)["proj"]
    expected = formula_balance_loss(layer, inputs["proj"], mask.T)  # token (s, b) is real when mask[b, s] is
    torch.testing.assert_close(layer.routing.balance_loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, formula_balance_loss(layer, inputs["proj"], mask))  # batch-first order


def test_a_positional_attention_mask_reaches_the_layers():
    model = train_like_(get_goat_model(tiny_classifier("bert", seed=0), CONFIG))
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad(), record_routing(model):
        model(ids, mask)
    positional = {name: layer.routing.balance_loss for name, layer in goat_layers(model).items()}
    with torch.no_grad(), record_routing(model):
        model(input_ids=ids, attention_mask=mask)
    for name, layer in goat_layers(model).items():
        assert torch.equal(positional[name], layer.routing.balance_loss), name
    query = goat_layers(model)["bert.encoder.layer.0.attention.self.query"]
    assert torch.equal(query.token_mask, mask.float())


def test_a_mask_of_the_same_size_but_another_shape_is_not_applied():
    model = train_like_(get_goat_model(SequenceFirst(), GoatConfig(r=8, num_experts=4, target_modules=["proj"])))
    layer = goat_layers(model)["proj"]
    x = torch.randn(3, 4, 32)  # 12 tokens, like a [2, 6] mask, but shaped [3, 4]
    layer.token_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    with torch.no_grad(), record_routing(model):
        layer(x)
    expected = formula_balance_loss(layer, x, None)
    torch.testing.assert_close(layer.routing.balance_loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_without_gradients_the_hook_leaves_the_layers_alone():
    """Decoding: nothing reads the mask without gradients unless a layer records routing, so the hook touches no layer
    (and keeps what a training forward handed them: gradient checkpointing recomputes with it after TRL's no-grad
    reference pass); a record under no_grad gets the current batch's mask."""
    model = train_like_(get_goat_model(tiny_classifier("bert", seed=0), CONFIG))
    ids, mask = torch.randint(3, 100, (2, 6)), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    layers = list(goat_layers(model).values())
    model(input_ids=ids, attention_mask=mask)  # with gradients: every layer gets the mask
    assert all(torch.equal(layer.token_mask, mask.float()) for layer in layers)
    sentinel = torch.zeros(2, 6)
    layers[0].token_mask = sentinel
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones(2, 6, dtype=torch.long))
    assert layers[0].token_mask is sentinel and torch.equal(layers[1].token_mask, mask.float())  # untouched
    other = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    with torch.no_grad(), record_routing(model):
        model(input_ids=ids, attention_mask=other)  # a record reads it: this batch's mask is handed over
    assert all(torch.equal(layer.token_mask, other.float()) for layer in layers)


def hook_hands_over(model, layer) -> bool:
    """Whether a no-grad forward hands `layer` this batch's mask (what the hook does while any layer records)."""
    ids, mask = torch.randint(3, 100, (2, 6)), torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    layer.token_mask = None
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return layer.token_mask is not None and torch.equal(layer.token_mask, mask.float())


def assert_one_count(model) -> None:
    """The hook reads one object the model's layers share, whose count is the number of layers that record."""
    (hook,) = [hook for hook in model._forward_pre_hooks.values() if isinstance(hook, TokenMaskHook)]
    layers = list(goat_layers(model).values())
    assert all(layer.routing_requests is hook.routing_requests for layer in layers)
    assert hook.routing_requests.count == sum(layer.record_routing for layer in layers)
    assert hook.routing_requests.active == any(layer.record_routing for layer in layers)


def test_one_layer_asking_for_its_record_gets_the_mask_until_it_stops():
    """The hook counts the layers that record (one number, not a read of every layer's flag): a flag set on one layer
    directly counts, nested and repeated requests balance, and the count follows a copy and a pickled model."""
    model = train_like_(get_goat_model(tiny_classifier("bert", seed=0), CONFIG))
    first, last = list(goat_layers(model).values())[0], list(goat_layers(model).values())[-1]
    assert_one_count(model)
    assert not hook_hands_over(model, last)
    first.record_routing = True
    first.record_routing = True  # asked twice, stopped once
    assert hook_hands_over(model, last) and first.routing is not None
    assert_one_count(model)
    with record_routing(model):
        assert hook_hands_over(model, last)
        assert_one_count(model)
    assert first.record_routing and not last.record_routing  # each layer's own flag is back
    assert hook_hands_over(model, last)  # the first layer still records
    first.record_routing = False
    assert not hook_hands_over(model, last) and not first.record_routing

    copy = deepcopy(model)
    list(goat_layers(copy).values())[0].record_routing = True  # counts in the copy's hook, not the original's
    assert hook_hands_over(copy, list(goat_layers(copy).values())[-1]) and not hook_hands_over(model, last)
    buffer = io.BytesIO()
    torch.save(copy, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    loaded_layers = list(goat_layers(loaded).values())
    for each in (model, copy, loaded):
        assert_one_count(each)
    assert hook_hands_over(loaded, loaded_layers[-1])
    loaded_layers[0].record_routing = False
    assert not hook_hands_over(loaded, loaded_layers[-1])
