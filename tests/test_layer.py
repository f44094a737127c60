"""GoatLinear: the fused forward against the per-expert reference loop, balance loss, dtypes, switches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_, plain_linear_forward, reference_goat_forward, svd_residual
from torch import nn

from goat_hf import GoatConfig, GoatLinear, disable_goat, keep_goat_in_fp32
from goat_hf.config import INIT_MODES
from goat_hf.fused import FusedGoatFunction
from goat_hf.prepare import fold_for_serving

N_IN, N_OUT = 48, 40  # n = in_features, m = out_features; h = min = 40

# (E, k): every top-k in {1, 2, E} that exists for E in {1, 2, 8}
EXPERTS_TOPK = sorted({(E, k) for E in (1, 2, 8) for k in (1, 2, E) if k <= E})
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASE_DTYPES = DTYPES | {"fp16": torch.float16}  # fp16 bases too, where the layer is compared with the loop
HALF_EPS = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # rounding of one half-precision result
INPUT_SHAPES = {"2d": (6, N_IN), "3d": (2, 5, N_IN)}
RANK = {1: 4, 2: 8, 8: 16}  # total rank r per expert count (d = 4, 4, 2)


def layer_config(init: str = "goat", num_experts: int = 2, top_k: int = 1, **config_kwargs) -> GoatConfig:
    r = config_kwargs.pop("r", RANK[num_experts])
    return GoatConfig(r=r, num_experts=num_experts, top_k=top_k, init=init, **config_kwargs)


def make_layer(
    init: str = "goat",
    num_experts: int = 2,
    top_k: int = 1,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    **config_kwargs,
) -> GoatLinear:
    base = nn.Linear(N_IN, N_OUT, bias=bias).to(dtype).requires_grad_(False)  # frozen, as injection leaves it
    config = layer_config(init, num_experts, top_k, **config_kwargs)
    return GoatLinear.from_linear(base, config, torch.Generator().manual_seed(0))  # seed 0: svd_residual's default


def trained_like(layer: GoatLinear) -> GoatLinear:
    """Experts and router moved away from their init, so the residual no longer equals the current factors."""
    perturb_(layer.expert_A, layer.expert_B, layer.router.weight)
    return layer


GRAD_NAMES = ["expert_A", "expert_B", "router.weight", "input"]


def task_and_balance_grads(
    layer: GoatLinear, x: torch.Tensor, y: torch.Tensor, balance: torch.Tensor, direction: torch.Tensor
) -> tuple[dict, torch.Tensor, dict]:
    """Gradients w.r.t. experts, router and input of the task loss (y * direction).sum(), of the balance loss
    alone (router), and of task + 0.7 * balance in one backward (what a training step sends)."""
    params = [layer.expert_A, layer.expert_B, layer.router.weight, x]
    task_loss = (y.double() * direction.double()).sum()
    task = torch.autograd.grad(task_loss, params, retain_graph=True)
    (router,) = torch.autograd.grad(balance, [layer.router.weight], retain_graph=True)
    both = torch.autograd.grad(task_loss + 0.7 * balance.double(), params)
    return dict(zip(GRAD_NAMES, task, strict=True)), router, dict(zip(GRAD_NAMES, both, strict=True))


def assert_grads_close(grads: dict, reference: dict, dtype: torch.dtype) -> None:
    """Each gradient within a tolerance relative to its largest entry: rounding of fp32 (or bf16 for the input
    gradient of a bf16 base, whose W0 x backward runs in bf16) against the fp64 reference."""
    for name, grad in grads.items():
        scale = reference[name].abs().max().item()
        rtol, atol = (2**-6, 2**-6 * scale) if name == "input" and dtype != torch.float32 else (1e-4, 1e-5 * scale)
        torch.testing.assert_close(grad, reference[name].to(grad.dtype), rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("shape", INPUT_SHAPES.values(), ids=INPUT_SHAPES.keys())
@pytest.mark.parametrize("dtype", BASE_DTYPES.values(), ids=BASE_DTYPES.keys())
@pytest.mark.parametrize(("num_experts", "top_k"), EXPERTS_TOPK, ids=[f"E{E}-k{k}" for E, k in EXPERTS_TOPK])
@pytest.mark.parametrize("init", INIT_MODES)
def test_fused_forward_and_gradients_match_per_expert_reference(init, num_experts, top_k, dtype, shape):
    layer = trained_like(make_layer(init, num_experts, top_k, dtype))
    x = torch.randn(shape).to(dtype).requires_grad_()
    direction = torch.randn(*shape[:-1], N_OUT).to(dtype)  # a fixed random loss direction

    y = layer(x)
    balance = layer.routing.balance_loss
    y_ref, balance_ref = reference_goat_forward(
        layer, x, svd_residual(layer.base_layer.weight, layer_config(init, num_experts, top_k))
    )

    assert_output_matches_reference(layer, x, y, y_ref, dtype)
    torch.testing.assert_close(balance.double(), balance_ref, rtol=1e-5, atol=1e-6)

    task, router, both = task_and_balance_grads(layer, x, y, balance, direction)
    task_ref, router_ref, both_ref = task_and_balance_grads(layer, x, y_ref, balance_ref, direction)
    # The gradient the task loss sends through the k routing weights is 0 for k = 1 (w = p/p) and rounding
    # noise of the order of the experts' gradients there: tolerances are relative to the largest gradient.
    scale = max(task_ref[name].abs().max().item() for name in GRAD_NAMES[:3])
    for name in GRAD_NAMES[:3]:
        torch.testing.assert_close(task[name], task_ref[name].to(task[name].dtype), rtol=1e-4, atol=1e-5 * scale)
    assert_grads_close({"input": task["input"]}, task_ref, dtype)
    assert task_ref["expert_A"].abs().max() > 0 and task_ref["expert_B"].abs().max() > 0
    assert (task_ref["router.weight"].abs().max() > 1e-3 * scale) == (top_k > 1)
    # With k = E every f_j is 1 and the balance loss is the constant E: its gradient is 0 up to rounding.
    torch.testing.assert_close(router, router_ref.to(router.dtype), rtol=1e-4, atol=1e-6)
    both_scale = max(both_ref[name].abs().max().item() for name in GRAD_NAMES[:3])
    for name in GRAD_NAMES[:3]:
        torch.testing.assert_close(both[name], both_ref[name].to(both[name].dtype), rtol=1e-4, atol=1e-5 * both_scale)
    assert_grads_close({"input": both["input"]}, both_ref, dtype)
    if num_experts == 8 and top_k < num_experts:  # (with E = 2, f_0 = f_1 also gives 0)
        assert router_ref.abs().max() > 1e-4


def assert_output_matches_reference(layer: GoatLinear, x, y: torch.Tensor, y_ref: torch.Tensor, dtype) -> None:
    """fp32: within fp32 rounding of the fp64 loop; bf16/fp16: base output, delta and their sum are each rounded to
    the half type, so a few ulps apart at most."""
    assert y.dtype == dtype and y.shape == y_ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
        return
    base = plain_linear_forward(layer.base_layer, x).float()
    delta = (y_ref.float() - base).abs()
    bound = HALF_EPS[dtype] * (base.abs() + delta + y_ref.float().abs()) + 1e-6
    assert ((y.float() - y_ref.float()).abs() <= bound).all()
    assert delta.max() > 5 * bound.max(), "adapter term too small to test in bf16"


@pytest.mark.parametrize("shape", INPUT_SHAPES.values(), ids=INPUT_SHAPES.keys())
@pytest.mark.parametrize("dtype", BASE_DTYPES.values(), ids=BASE_DTYPES.keys())
@pytest.mark.parametrize(("num_experts", "top_k"), EXPERTS_TOPK, ids=[f"E{E}-k{k}" for E, k in EXPERTS_TOPK])
@pytest.mark.parametrize("init", INIT_MODES)
def test_inference_forward_matches_per_expert_reference(init, num_experts, top_k, dtype, shape, monkeypatch):
    """Evaluation and generate run goat_hf/decode.py's forward (no autograd Function, no routing record): it is
    judged by the same loop as the training forward."""
    layer = trained_like(make_layer(init, num_experts, top_k, dtype)).eval()
    x = torch.randn(shape).to(dtype)
    y_ref, _ = reference_goat_forward(
        layer, x, svd_residual(layer.base_layer.weight, layer_config(init, num_experts, top_k))
    )
    monkeypatch.setattr(FusedGoatFunction, "apply", None)  # the training path would fail: not taken
    with torch.no_grad():
        y = layer(x)
    assert layer.routing is None
    assert_output_matches_reference(layer, x, y, y_ref.detach(), dtype)


@pytest.mark.parametrize(("num_experts", "top_k"), EXPERTS_TOPK, ids=[f"E{E}-k{k}" for E, k in EXPERTS_TOPK])
def test_balance_loss_is_k_under_uniform_routing(num_experts, top_k):
    layer = make_layer("goat", num_experts, top_k)
    with torch.no_grad():
        layer.router.weight.zero_()  # every probability 1/E
    layer(torch.randn(9, N_IN))
    torch.testing.assert_close(layer.routing.balance_loss, torch.tensor(float(top_k)))
    assert layer.routing.expert_load.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(("num_experts", "top_k"), [(2, 1), (8, 2)], ids=["E2-k1", "E8-k2"])
def test_balance_loss_formula(num_experts, top_k):
    layer = trained_like(make_layer("goat", num_experts, top_k))
    x = torch.randn(11, N_IN)
    layer(x)
    probs = torch.softmax(x @ layer.router.weight.T, dim=-1)  # [T, E]
    picks = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).float()  # [T, E]
    f, P = picks.sum(0) / x.shape[0], probs.mean(0)
    expected = num_experts * (f * P).sum()
    torch.testing.assert_close(layer.routing.balance_loss, expected)
    torch.testing.assert_close(layer.routing.expert_load, f / top_k)


def test_balance_loss_excludes_padding_tokens():
    layer = trained_like(make_layer("goat", 8, 2))
    x = torch.randn(2, 5, N_IN)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])

    layer.token_mask = None
    layer(x[mask.bool()])  # the 7 real tokens alone
    unpadded = layer.routing.balance_loss
    unpadded_load = layer.routing.expert_load
    y_all = layer(x)
    with_padding = layer.routing.balance_loss

    layer.token_mask = mask
    y_masked = layer(x)
    torch.testing.assert_close(layer.routing.balance_loss, unpadded)
    torch.testing.assert_close(layer.routing.expert_load, unpadded_load)
    assert not torch.allclose(with_padding, unpadded)  # the padding would have changed it
    assert torch.equal(y_masked, y_all)  # the mask only affects the balance loss
    _, reference = reference_goat_forward(layer, x, layer.base_layer.weight, token_mask=mask)  # W_res unused here
    torch.testing.assert_close(layer.routing.balance_loss.double(), reference, rtol=1e-6, atol=1e-7)


def test_balance_loss_gradient_reaches_router_only():
    layer = trained_like(make_layer("goat", 8, 2))
    layer(torch.randn(7, N_IN))
    layer.routing.balance_loss.backward()
    assert layer.router.weight.grad.abs().max() > 0
    assert layer.expert_A.grad is None and layer.expert_B.grad is None


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("init", INIT_MODES)
def test_disabled_adapter_is_exactly_w0(init, dtype):
    layer = trained_like(make_layer(init, 8, 2, dtype))
    x = torch.randn(2, 5, N_IN).to(dtype)
    expected = plain_linear_forward(layer.base_layer, x)
    assert not torch.equal(layer(x), expected)
    with disable_goat(layer):
        assert torch.equal(layer(x), expected)
    assert layer.adapter_enabled
    layer.adapter_enabled = False
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("init", INIT_MODES)
def test_single_expert_at_init_equals_w0(init):
    layer = make_layer(init, num_experts=1, top_k=1)
    assert layer.init_cof == 1.0
    x = torch.randn(2, 5, N_IN)
    expected = plain_linear_forward(layer.base_layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("init", ["goat", "zero"])
def test_fp32_adapters_and_router_on_bf16_base(init):
    layer = make_layer(init, 8, 2, torch.bfloat16)
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.weight is layer.base_layer.weight
    assert layer.expert_A.dtype == layer.expert_B.dtype == layer.router.weight.dtype == torch.float32
    if init != "zero":
        assert layer.residual_A.dtype == layer.residual_B.dtype == torch.float32
    x = torch.randn(3, N_IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.routing.probs.dtype == torch.float32
    y.float().sum().backward()
    assert layer.expert_A.grad.dtype == layer.expert_B.grad.dtype == torch.float32


def test_adapter_path_stays_fp32_under_bf16_autocast():
    """Under autocast only the base matmul drops to bf16: routing and experts compute in fp32. With W0 = 0 the
    output is the adapter term alone, rounded once to bf16, so it is held to the fp64 reference within one bf16 ulp
    (experts in bf16 would round their terms, which nearly cancel the residual's, by far more)."""
    layer = make_layer("goat", 8, 2)
    W0 = layer.base_layer.weight.detach().double()
    W_res_minus_W0 = svd_residual(W0, layer_config("goat", 8, 2)) - W0
    perturb_(layer.expert_B, layer.router.weight)
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
    x = torch.randn(4, 6, N_IN)
    with torch.no_grad():
        reference, _ = reference_goat_forward(layer, x, W_res_minus_W0)  # the adapter term, from the formulas
    layer.record_routing = True  # under no_grad the layer records only on request
    with torch.no_grad():
        layer(x)
        picks, probs = layer.routing.top_experts.clone(), layer.routing.probs.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.routing.probs.dtype == torch.float32
    assert torch.equal(layer.routing.top_experts, picks) and torch.equal(layer.routing.probs, probs)
    # One rounding to bf16 is at most half an ulp (2^-8 relative): allowed, one ulp (2^-7), fp32 noise included.
    excess = (y.float() - reference).abs() / (2.0**-7 * reference.abs() + 1e-7)
    assert excess.max() <= 1, f"{(excess > 1).sum()} of {excess.numel()} outputs off by more than one bf16 ulp"


def test_zero_init_has_no_residual():
    layer = make_layer("zero", 2, 1)
    assert layer.residual_A is None and layer.residual_B is None
    assert torch.count_nonzero(layer.expert_B) == 0 and torch.count_nonzero(layer.expert_A) > 0
    assert "residual_A" not in layer.state_dict()


def test_routing_record_is_overwritten_each_forward():
    layer = make_layer("goat", 8, 2)
    layer(torch.randn(5, N_IN))
    first = layer.routing
    x = torch.randn(3, 4, N_IN)
    layer(x)
    second = layer.routing
    assert second is not first
    assert second.probs.shape == (12, 8) and second.top_experts.shape == (12, 2)
    torch.testing.assert_close(second.probs, torch.softmax(x.reshape(-1, N_IN) @ layer.router.weight.T, -1))
    assert not second.probs.requires_grad


def test_dropout_mask_is_shared_by_the_experts():
    """Documented shortcut (DESIGN §2): one dropout mask for all experts, the reference draws one per expert."""
    num_experts = 8
    layer = trained_like(make_layer("goat", num_experts, num_experts, lora_dropout=0.3)).train()
    x = torch.randn(6, N_IN)
    W_res = svd_residual(layer.base_layer.weight, layer_config("goat", num_experts, num_experts))

    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    shared = F.dropout(x, p=0.3, training=True)  # the one mask the layer drew
    one_mask, _ = reference_goat_forward(layer, x, W_res, expert_inputs=[shared] * num_experts)
    torch.manual_seed(5)
    per_expert = [F.dropout(x, p=0.3, training=True) for _ in range(num_experts)]
    many_masks, _ = reference_goat_forward(layer, x, W_res, expert_inputs=per_expert)

    scale = y.abs().max().item()
    torch.testing.assert_close(y, one_mask.float(), rtol=1e-5, atol=1e-5 * scale)
    assert (y - many_masks.float()).abs().max() > 1e-3 * scale

    layer.eval()  # no dropout at eval: the plain reference
    plain = reference_goat_forward(layer, x, W_res)[0].float()
    torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", BASE_DTYPES.values(), ids=BASE_DTYPES.keys())
@pytest.mark.parametrize(("num_experts", "top_k"), EXPERTS_TOPK, ids=[f"E{E}-k{k}" for E, k in EXPERTS_TOPK])
@pytest.mark.parametrize("init", ["goat", "zero"])
def test_dropout_forward_and_gradients_match_per_expert_reference(init, num_experts, top_k, dtype):
    """Training with dropout > 0 (its own path): outputs and every gradient against the loop with the same mask."""
    layer = trained_like(make_layer(init, num_experts, top_k, dtype, lora_dropout=0.3)).train()
    x = torch.randn(2, 5, N_IN).to(dtype).requires_grad_()
    direction = torch.randn(2, 5, N_OUT).to(dtype)
    W_res = svd_residual(layer.base_layer.weight, layer_config(init, num_experts, top_k))

    torch.manual_seed(5)
    y = layer(x)
    balance = layer.routing.balance_loss
    torch.manual_seed(5)
    shared = F.dropout(x.float(), p=0.3, training=True)  # the one mask the layer drew, differentiable in x
    y_ref, balance_ref = reference_goat_forward(layer, x, W_res, expert_inputs=[shared] * num_experts)

    scale = y_ref.float().abs().max().item()
    rtol = 1e-5 if dtype == torch.float32 else 2**-6  # bf16: the base output and the sum are rounded to bf16
    tolerance = {"rtol": rtol, "atol": rtol * scale}
    torch.testing.assert_close(y.float(), y_ref.float(), **tolerance)
    torch.testing.assert_close(balance.double(), balance_ref, rtol=1e-5, atol=1e-6)
    _, _, both = task_and_balance_grads(layer, x, y, balance, direction)
    _, _, both_ref = task_and_balance_grads(layer, x, y_ref, balance_ref, direction)
    assert_grads_close(both, both_ref, dtype)


def test_dropout_does_not_touch_the_residual_path():
    """The residual W_res - W0 acts on the clean x: with B = 0 the output is W_res x whatever the mask."""
    layer = make_layer("goat", 2, 1, lora_dropout=0.5).train()
    with torch.no_grad():
        layer.expert_B.zero_()
    x = torch.randn(4, N_IN)
    W_res = svd_residual(layer.base_layer.weight, layer_config("goat", 2, 1))
    expected = (x.double() @ W_res.T + layer.base_layer.bias.double()).float()
    assert not torch.allclose(expected, plain_linear_forward(layer.base_layer, x), atol=1e-3)  # W_res is not W0
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_extra_repr_names_the_settings():
    text = repr(make_layer("goat", 8, 2))
    assert "num_experts=8" in text and "top_k=2" in text and "expert_rank=2" in text and "residual=True" in text


def test_no_grad_forwards_follow_every_weight_change():
    """Evaluation keeps the stacked weights between no-grad forwards; any change of a weight must show at once
    (compared with the grad-enabled forward, which stacks them anew each time and is checked against the loop).
    The two differ by fp32 rounding only (the inference path folds s into B); a stale weight moves them by ~0.1."""
    layer = trained_like(make_layer("goat", 8, 2)).eval()
    x = torch.randn(5, N_IN)
    with torch.no_grad():
        first = layer(x)
        layer.expert_B.add_(0.5)  # an optimizer step is an in-place update like this one
        changed = layer(x)
    torch.testing.assert_close(changed, layer(x).detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first, changed)
    state = {key: value + 0.1 for key, value in layer.state_dict().items() if key != "base_layer.weight"}
    layer.load_state_dict(state, strict=False)  # router, experts and the residual buffers
    with torch.no_grad():
        reloaded = layer(x)
    torch.testing.assert_close(reloaded, layer(x).detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(changed, reloaded)


def test_no_grad_forwards_follow_top_k_and_replaced_tensors():
    """What the cache key must also see: a new top_k (judged by the loop reference) and a parameter whose tensor is
    replaced (`param.data = t` keeps the version counter; a freed address may come back for the next tensor)."""
    layer = trained_like(make_layer("goat", 8, 1)).eval()
    x = torch.randn(5, N_IN)
    with torch.no_grad():
        layer(x)
        layer.top_k = 8
        y = layer(x)
    y_ref, _ = reference_goat_forward(layer, x, svd_residual(layer.base_layer.weight, layer_config("goat", 8, 1)))
    assert_output_matches_reference(layer, x, y, y_ref.detach(), torch.float32)
    with torch.no_grad():
        layer.expert_B.data = torch.zeros_like(layer.expert_B)
        layer.expert_B.data = torch.full_like(layer.expert_B, 0.5)
        replaced = layer(x)
    torch.testing.assert_close(replaced, layer(x).detach(), rtol=1e-5, atol=1e-6)


def test_weights_made_under_inference_mode_decode_and_show_in_place_changes():
    """Tensors made under torch.inference_mode (a model loaded inside one, as some serving code does) have no version
    counter, which the folded weights' cache is keyed on: such a layer failed on its first forward ("Inference
    tensors do not track version counter"). It must give the loop reference's numbers, keep its folded weights
    between calls (folding them anew every call made a 576x1536 layer's one-token call 2.4x slower), and a change
    made in place under inference_mode must reach the output once the cache is dropped (eval(), or goat_hf's own
    loaders)."""
    reference = trained_like(make_layer("goat", 8, 2)).eval()
    W_res = svd_residual(reference.base_layer.weight, layer_config("goat", 8, 2))
    x = torch.randn(5, N_IN)
    with torch.inference_mode():
        layer = make_layer("goat", 8, 2).eval()
        layer.load_state_dict(reference.state_dict())
        assert layer.expert_B.is_inference()
        y = layer(x)
        cached = layer._inference_cache
        layer(x)
        assert layer._inference_cache is cached
        layer.expert_B.mul_(2.0)
        layer.eval()
        y_changed = layer(x)
    y_ref, _ = reference_goat_forward(reference, x, W_res)
    assert_output_matches_reference(layer, x, y, y_ref.detach(), torch.float32)
    with torch.no_grad():
        reference.expert_B.mul_(2.0)
        y_ref, _ = reference_goat_forward(reference, x, W_res)
        assert_output_matches_reference(layer, x, y_changed, y_ref.detach(), torch.float32)
        assert_output_matches_reference(layer, x, layer(x), y_ref.detach(), torch.float32)  # and outside it


@pytest.mark.parametrize("prepared", [False, True], ids=["default", "prepared"])
def test_a_minus_inf_logit_is_never_picked_and_never_reaches_the_output(prepared):
    """A router row that overflows to a -inf logit: that expert is never picked, as in the training forward; the
    inference forward must not multiply the logits by anything (0 · -inf = NaN)."""
    layer = trained_like(make_layer("goat", 8, 2)).eval()
    x = torch.ones(3, N_IN)
    with torch.no_grad():
        layer.router.weight[0] = -1e38
        assert layer.router(x)[:, 0].eq(float("-inf")).all()
    training = layer(x).detach()
    if prepared:
        layer.prepared = fold_for_serving(layer)
    with torch.no_grad():
        y = layer(x)
    assert training.isfinite().all()
    torch.testing.assert_close(y, training, rtol=1e-5, atol=1e-5)


def test_an_adapter_cast_with_the_base_serves_but_refuses_to_train():
    """model.to(bf16) casts the experts and router too: inference folds them in fp32 (the same numbers as after
    keep_goat_in_fp32), training says what to do instead of failing on a matmul of mixed dtypes."""
    layer = trained_like(make_layer("goat", 8, 2, torch.bfloat16)).eval().to(torch.bfloat16)
    x = torch.randn(4, N_IN, dtype=torch.bfloat16)
    assert layer.expert_A.dtype == torch.bfloat16
    with torch.no_grad():
        cast = layer(x)
    with pytest.raises(RuntimeError, match=r"torch.bfloat16 here .*keep_goat_in_fp32\(model\)"):
        layer(x)
    keep_goat_in_fp32(layer)
    assert {t.dtype for t in (layer.expert_A, layer.router.weight, layer.residual_B)} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(layer(x), cast)
    assert layer(x).dtype == torch.bfloat16  # and it trains again
