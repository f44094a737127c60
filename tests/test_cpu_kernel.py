"""The CPU decode kernel (goat_hf/csrc/decode_cpu.cpp): the per-expert reference's numbers (residual columns, ties),
clear errors for bad input, and a fallback to ATen ops that says why when it cannot be built or is switched off.
Prepared layers through it: tests/test_prepare.py."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import reference_goat_forward, svd_residual
from test_layer import layer_config, make_layer, trained_like
from test_prepare import forbid_aten_path, prepared_layer_model, trained_llama

from goat_hf import cpu_kernel, goat_layers, prepare_for_inference
from goat_hf.decode import attach_kernel_, inference_weights


def built_kernel():
    kernel = cpu_kernel.decode_kernel()
    assert kernel is not None, f"the CPU kernel could not be built here: {cpu_kernel.build_failure()}"
    return kernel


@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (2, 1), (1, 1)], ids=["E8-k2", "E2-k1", "E1-k1"])
@pytest.mark.parametrize("tokens", [1, 9])
def test_kernel_with_residual_columns_matches_per_expert_reference(num_experts, top_k, tokens):
    """The default path's weights carry the residual's r columns after the experts': the kernel must leave them
    ungated. W0 plus [A; -c·s·A0] and [s·B | B0] is then W_res plus the experts, as the reference computes it."""
    layer = trained_like(make_layer("goat", num_experts, top_k, bias=True)).eval()
    x = torch.randn(tokens, layer.in_features)
    W_res = svd_residual(layer.base_layer.weight, layer_config("goat", num_experts, top_k))
    y_ref, _ = reference_goat_forward(layer, x, W_res)
    w = layer._inference_weights()
    assert w.kernel is not None and w.down_t.shape[1] == 2 * w.expert_columns  # experts' and residual's columns
    base = layer.base_layer
    with torch.no_grad():
        y = built_kernel()(x, base.weight, base.bias, w.router_down_t, w.up_t, top_k, w.expert_columns)
    torch.testing.assert_close(y, y_ref.detach().float(), rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())


def test_kernel_breaks_ties_towards_the_lower_expert():
    """Equal logits (a zero router): experts 0 and 1 get half the weight each, as decode.fusable_top_k_gates picks."""
    E, d, n, m, s = 4, 2, 6, 5, 0.7
    A, B, W0, bias = torch.randn(E * d, n), torch.randn(m, E * d), torch.randn(m, n), torch.randn(m)
    x = torch.randn(3, n)
    w = attach_kernel_(inference_weights(torch.zeros(E, n), A, B, None, None, s, 0.0), built_kernel())
    with torch.no_grad():
        y = w.kernel(x, W0, bias, w.router_down_t, w.up_t, 2, w.expert_columns)
    A, B, x = A.double(), B.double(), x.double()
    picked = [0.5 * s * (B[:, j * d : (j + 1) * d] @ (A[j * d : (j + 1) * d] @ x.T)) for j in (0, 1)]
    expected = F.linear(x, W0.double(), bias.double()) + sum(picked).T
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_bad_input_with_what_it_needs():
    w = attach_kernel_(
        inference_weights(torch.randn(4, 6), torch.randn(8, 6), torch.randn(5, 8), None, None, 1.0, 0.0), built_kernel()
    )
    W0, x, kernel, rd, up = torch.randn(5, 6), torch.randn(3, 6), w.kernel, w.router_down_t, w.up_t
    with pytest.raises(RuntimeError, match=r"x must be an fp32 CPU tensor, got BFloat16 \[3, 6\]"):
        kernel(x.bfloat16(), W0, None, rd, up, 2, 8)
    with pytest.raises(RuntimeError, match=r"weight must be a 2-D fp32 CPU tensor, got Float \[5, 6, 1\]"):
        kernel(x, W0[..., None], None, rd, up, 2, 8)
    with pytest.raises(RuntimeError, match=r"x must be \[\.\.\., 6\], got \[3, 5\]"):
        kernel(x[:, :5], W0, None, rd, up, 2, 8)
    with pytest.raises(RuntimeError, match=r"router_down_t needs the E router columns before up_t's 8, got 8 columns"):
        kernel(x, W0, None, rd[:, 4:], up, 2, 8)
    with pytest.raises(RuntimeError, match=r"top_k must be in \[1, 4\], got 0"):
        kernel(x, W0, None, rd, up, 0, 8)
    with pytest.raises(RuntimeError, match=r"expert_columns \(6\) must be a multiple of E \(4\)"):
        kernel(x, W0, None, rd, up, 2, 6)


def test_prepared_layer_under_autograd_takes_the_aten_path_and_its_gradients():
    """The kernel writes the gates into its activations in place, without autograd: with gradients enabled (say, for
    input attributions) a prepared layer runs ATen ops, and d y / d x is the reference's."""
    layer = trained_like(make_layer("goat", 8, 2, bias=True))
    x = torch.randn(4, layer.in_features, dtype=torch.float64).requires_grad_(True)
    W_res = svd_residual(layer.base_layer.weight, layer_config("goat", 8, 2))
    y_ref, _ = reference_goat_forward(layer, x, W_res)
    (grad_ref,) = torch.autograd.grad(y_ref.sum(), x)
    prepared_layer_model(layer)
    assert layer.prepared.kernel is not None, cpu_kernel.build_failure()
    x32 = x.detach().float().requires_grad_(True)
    layer(x32).sum().backward()
    torch.testing.assert_close(x32.grad, grad_ref.float(), rtol=1e-4, atol=1e-4 * grad_ref.abs().max().item())


def test_prepare_falls_back_to_aten_ops_and_says_why_when_the_kernel_cannot_be_built(monkeypatch):
    def no_compiler():
        raise RuntimeError("building failed\nerror: command 'c++' failed: No such file or directory")

    monkeypatch.setattr(cpu_kernel, "_loaded", None)
    monkeypatch.setattr(cpu_kernel, "_failure", None)
    monkeypatch.setattr(cpu_kernel, "_build", no_compiler)
    model, prepared = trained_llama(), trained_llama()
    with pytest.warns(
        RuntimeWarning,
        match=r"could not build its CPU decode kernel \(error: command 'c\+\+' failed.*"
        r"ATen ops instead.*pip install ninja.*GOAT_HF_CPU_KERNEL=0",
    ):
        prepare_for_inference(prepared)
    assert all(layer.prepared.kernel is None for layer in goat_layers(prepared).values())
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(prepared(ids).logits, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: a second model prepared in the process does not warn again
        prepare_for_inference(trained_llama())


def test_kernel_switched_off_is_never_built(monkeypatch):
    def forbidden():
        raise AssertionError("GOAT_HF_CPU_KERNEL=0 must not build the kernel")

    monkeypatch.setenv("GOAT_HF_CPU_KERNEL", "0")
    monkeypatch.setattr(cpu_kernel, "_loaded", None)
    monkeypatch.setattr(cpu_kernel, "_build", forbidden)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = prepare_for_inference(trained_llama())
    assert all(layer.prepared.kernel is None for layer in goat_layers(model).values())


def test_default_layer_in_eval_decodes_through_the_kernel(monkeypatch):
    """No call needed: an unprepared layer's no-grad forward takes the kernel, and matches the loop reference."""
    layer = trained_like(make_layer("goat", 8, 2, bias=True)).eval()
    x = torch.randn(2, 3, layer.in_features)
    y_ref, _ = reference_goat_forward(layer, x, svd_residual(layer.base_layer.weight, layer_config("goat", 8, 2)))
    forbid_aten_path(monkeypatch)
    with torch.no_grad():
        y = layer(x)
    assert layer._inference_cache.kernel is not None
    torch.testing.assert_close(y, y_ref.detach().float(), rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())


def test_nan_router_gives_nan_outputs_as_topk_does():
    """torch.topk ranks NaN above every number: the ATen path's output is then NaN, and the kernel's must not be a
    silently finite one that dropped the NaN expert."""
    E, n, m = 4, 6, 5
    w = attach_kernel_(
        inference_weights(torch.randn(E, n), torch.randn(8, n), torch.randn(m, 8), None, None, 1.0, 0.0), built_kernel()
    )
    w.router_down_t[:, 2] = float("nan")  # expert 2's logit, for every token
    with torch.no_grad():
        y = w.kernel(torch.randn(3, n), torch.randn(m, n), None, w.router_down_t, w.up_t, 2, w.expert_columns)
    assert y.isnan().all()


@pytest.mark.parametrize("prepared", [False, True], ids=["default", "prepared"])
def test_pickled_layer_carries_no_kernel_function_and_reloads_it(prepared, monkeypatch):
    """torch.save or a spawned process pickles the layers, with their folded weights: the compiled module's function
    must not be in the pickle (a new process could not import it), and the unpickled layer loads the kernel itself."""
    layer = trained_like(make_layer("goat", 8, 2, bias=True)).eval()
    if prepared:
        prepared_layer_model(layer)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        expected = layer(x)  # the default layer caches its folded weights, the kernel with them
    weights = layer.prepared if prepared else layer._inference_cache
    assert weights.kernel is not None
    data = pickle.dumps(layer)
    assert cpu_kernel.NAME.encode() not in data
    copy = pickle.loads(data)
    assert (copy.prepared if prepared else copy._inference_cache).kernel is cpu_kernel.decode_kernel()
    forbid_aten_path(monkeypatch)
    with torch.no_grad():
        assert torch.equal(copy(x), expected)


def refuse_kernel(*args):
    raise AssertionError("the CPU kernel ran where the general path should have")


CASES = ["adapter off", "hook on the base", "pre-hook on the base", "record routing", "autocast", "dropout"]


@pytest.mark.parametrize("case", CASES)
def test_what_the_kernel_does_not_handle_goes_to_the_general_path(case):
    """forward() tries the kernel first with a few cheap checks (GoatLinear.forward): each state it does not handle
    must reach the path that handles it, never the kernel."""
    layer = trained_like(make_layer("goat", 8, 2, bias=True, lora_dropout=0.5 if case == "dropout" else 0.0)).eval()
    x = torch.randn(2, 3, layer.in_features)
    with torch.no_grad():
        y_kernel = layer(x)  # through the kernel (test_default_layer_in_eval_decodes_through_the_kernel)
    layer.train(case == "dropout")
    layer._inference_weights().kernel = refuse_kernel  # what the fast path would call
    seen = []
    if case == "adapter off":
        layer.adapter_enabled = False
    elif case == "hook on the base":  # an accelerate offload hook must see its layer's call
        layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out))
    elif case == "pre-hook on the base":
        layer.base_layer.register_forward_pre_hook(lambda module, args: seen.append(args))
    elif case == "record routing":
        layer.record_routing = True
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        y = layer(x)
    close = torch.allclose(y.float(), y_kernel, rtol=1e-5, atol=1e-5 * y_kernel.abs().max().item())
    expected = {
        "adapter off": lambda: torch.equal(y, F.linear(x, layer.base_layer.weight, layer.base_layer.bias)),
        "hook on the base": lambda: len(seen) == 1 and close,
        "pre-hook on the base": lambda: len(seen) == 1 and close,
        "record routing": lambda: layer.routing is not None and layer.routing.probs.shape == (6, 8) and close,
        "autocast": lambda: y.dtype == torch.bfloat16,  # the base ran under autocast, the adapter added in fp32
        "dropout": lambda: not close,  # the experts saw dropout(x)
    }[case]
    assert expected()


@pytest.mark.parametrize("prepared", [False, True], ids=["default", "prepared"])
def test_a_trace_under_no_grad_records_the_maths_not_the_kernel(prepared):
    """torch.jit.trace (and exporters built on it) record ATen ops: the kernel's call from Python, with its gating in
    C++, is not one, so a trace through it replayed two matmuls without the gates, silently wrong on every input.
    Traced under no_grad, the layer must replay the loop reference's numbers on inputs it was not traced with."""
    layer = trained_like(make_layer("goat", 8, 2, bias=True)).eval()
    W_res = svd_residual(layer.base_layer.weight, layer_config("goat", 8, 2))
    if prepared:
        prepared_layer_model(layer)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(layer, torch.randn(3, layer.in_features), check_trace=False)
        x = torch.randn(5, layer.in_features)
        y = traced(x)
    y_ref, _ = reference_goat_forward(layer, x, W_res)
    torch.testing.assert_close(y, y_ref.detach().float(), rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())


def test_a_build_killed_midway_does_not_hang_the_next_load(tmp_path, monkeypatch):
    """torch's lock file, left by a builder that was killed (SIGKILL, SIGTERM, an OOM kill during a first evaluation),
    made every later load wait for it forever. The next process must remove it, say so, and load the kernel."""
    built_kernel()
    from torch.utils import cpp_extension

    built = Path(cpp_extension._get_build_directory(cpu_kernel.NAME, verbose=False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    copy = Path(cpp_extension._get_build_directory(cpu_kernel.NAME, verbose=False))  # where the next process looks
    shutil.copytree(built, copy, dirs_exist_ok=True)  # built already: the next load compiles nothing
    (copy / "lock").touch()  # what a killed build leaves
    code = "from goat_hf import cpu_kernel; assert cpu_kernel.decode_kernel() is not None, cpu_kernel.build_failure()"
    try:  # the subprocess inherits TORCH_EXTENSIONS_DIR; it loads in ~3 s (a rebuild, should ninja want one: ~40 s)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("loading the kernel waited on the killed build's lock file for 120 s")
    assert done.returncode == 0, done.stderr
    assert "left by a kernel build that was killed" in done.stderr
    assert not (copy / "lock").exists()
