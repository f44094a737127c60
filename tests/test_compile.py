"""torch.compile of the inference forward: one graph (fullgraph=True fails on any graph break), the same outputs as
eager, and weight changes seen by the compiled forward (it cannot check the eager cache's version key, so it reads
the layer's own factors; a prepared fp32 layer reads the [W_res | s·B] and [W_r; A] prepare built, which never
change). Dynamo's "eager" backend traces exactly what inductor would compile, in seconds; the speed of the inductor
build is measured by benchmarks/bench_decode.py --compile."""

from __future__ import annotations

import copy
import gc
import re

import pytest
import torch
from conftest import reference_goat_forward, svd_residual, tiny_llama, train_like_
from test_layer import EXPERTS_TOPK, layer_config, make_layer, trained_like
from test_prepare import prepared_layer_model
from torch._inductor.utils import run_and_get_code
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import CompileConfig

import goat_hf.layer as goat_layer_module
from goat_hf import GoatConfig, cpu_kernel, get_goat_model, goat_layers, prepare_for_inference
from goat_hf.decode import SUMMED_TOKENS, fusable_top_k_gates, top_k_gates

CONFIG = GoatConfig(r=8, num_experts=4, top_k=2)
IDS = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
LAYER_CONFIG = layer_config(num_experts=8, top_k=2)  # make_layer's, for the reference's residual


def trained_llama(config: GoatConfig = CONFIG, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return train_like_(get_goat_model(tiny_llama().to(dtype), config)).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def traced_forward(monkeypatch):
    """The traced forward unless a test loads the CPU kernel (use_cpu_kernel): which one a compiled CPU layer takes
    depends on whether the process has the kernel, so each test says which it tests."""
    monkeypatch.setattr(cpu_kernel, "_loaded", None)
    monkeypatch.setenv("GOAT_HF_CPU_KERNEL", "0")  # nor may an eager call load it


def use_cpu_kernel(monkeypatch) -> None:
    monkeypatch.delenv("GOAT_HF_CPU_KERNEL")
    assert cpu_kernel.decode_kernel() is not None, cpu_kernel.build_failure()


KERNEL = pytest.mark.parametrize("kernel", [False, True], ids=["traced", "cpu-kernel"])


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 rounding, through two decoder layers: the compiled path applies s as addmm's alpha where the eager one
    folded it into B (a stale or wrong weight moves the logits by ~0.1 and more)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


CASES = {
    "default": (CONFIG, False),
    "prepared": (CONFIG, True),
    "zero-init": (GoatConfig(r=8, num_experts=4, top_k=2, init="zero"), False),
    "top-k-is-E": (GoatConfig(r=8, num_experts=4, top_k=4), False),
}


@KERNEL
@pytest.mark.parametrize(("config", "prepared"), CASES.values(), ids=CASES.keys())
def test_compiled_forward_is_one_graph_with_the_eager_outputs(config, prepared, kernel, monkeypatch):
    if kernel:
        use_cpu_kernel(monkeypatch)
    model = trained_llama(config)
    if prepared:
        prepare_for_inference(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_logits_close(compiled(IDS).logits, model(IDS).logits)


def bf16_rounding_midpoints_near(delta: torch.Tensor, band: float = 1e-5) -> torch.Tensor:
    """Where the fp64 `delta` [T, m] lies so close to a midpoint between two bf16 numbers that an fp32 computation of
    it may round either way. fp32's error grows with the terms summed, not with the sum, so the band is relative to
    the largest |delta| of the token (measured errors: < 1e-6 of it)."""
    rounded = delta.to(torch.bfloat16)
    ends = [torch.tensor(end, dtype=torch.bfloat16) for end in (float("inf"), -float("inf"))]
    midpoints = torch.stack([(rounded.double() + torch.nextafter(rounded, end).double()) / 2 for end in ends])
    return ((delta - midpoints).abs() < band * delta.abs().amax(-1, keepdim=True)).any(0)


@pytest.mark.parametrize("forward", ["compiled", "eager"])
def test_a_bf16_base_output_plus_the_adapter_rounded_once(forward):
    """A half base's output plus the adapter's delta rounded to bf16 on its own, W0 x + bf16(delta), in both forwards
    (the bug: adding the fp32 delta to the base output and rounding the sum, a different bf16 number in a quarter of
    the outputs here). The delta comes from the reference in fp64; the two forwards compute it in fp32 in different
    orders (a generated sum, a library matmul), so outputs whose delta lies within fp32 rounding of a bf16 midpoint
    are not compared (~5 %). The experts are scaled up so that the delta is as large as W0 x."""
    layer = trained_like(make_layer(num_experts=8, top_k=2, dtype=torch.bfloat16)).eval()
    with torch.no_grad():
        layer.expert_B.mul_(3)
    x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    run = torch.compile(layer, fullgraph=True, backend="eager") if forward == "compiled" else layer
    reference = copy.deepcopy(layer)
    reference.base_layer.double()  # the reference's output in fp64: W_res x + the experts' sum, not rounded
    with torch.no_grad():
        out, base_out = run(x), layer.base_layer(x)
        full, _ = reference_goat_forward(reference, x.double(), svd_residual(layer.base_layer.weight, LAYER_CONFIG))
        delta = full - reference.base_layer(x.double())
    expected = base_out + delta.to(torch.bfloat16)
    compared = ~bf16_rounding_midpoints_near(delta)
    assert compared.float().mean() > 0.9
    assert torch.equal(out[compared], expected[compared])
    rounded_once = (base_out.double() + delta).to(torch.bfloat16)  # the bug
    assert (rounded_once[compared] != expected[compared]).float().mean() > 0.1  # the test can fail


def test_compiled_model_on_a_bf16_base_matches_eager():
    model = trained_llama(dtype=torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected = model(IDS).logits
        torch.testing.assert_close(compiled(IDS).logits, expected, rtol=0, atol=2e-2 * expected.abs().max().item())


@KERNEL
def test_compiled_forward_sees_weight_changes(kernel, monkeypatch):
    """A compiled evaluation after more training steps must use the new weights, not the ones the eager cache held
    (the bug: reading the cached stacked weights in the graph, where their version key cannot be checked)."""
    if kernel:
        use_cpu_kernel(monkeypatch)
    model = trained_llama()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        before = compiled(IDS).logits
        model(IDS)  # fills the eager cache with these weights
        for layer in goat_layers(model).values():
            layer.expert_B.mul_(3.0)  # an optimizer step is an in-place update like this one
        after = compiled(IDS).logits
        assert_logits_close(after, model(IDS).logits)
    assert (after - before).abs().max() > 1e-3


@KERNEL
def test_generate_with_a_static_cache_compiles_without_graph_breaks(kernel, monkeypatch):
    """What `generate` does with `cache_implementation="static"` and a compile config (on CPU it must be asked):
    the decode step is compiled with fullgraph=True, so any graph break raises; the greedy tokens are eager's."""
    if kernel:
        use_cpu_kernel(monkeypatch)
    model = trained_llama()
    with torch.no_grad():
        eager = model.generate(IDS, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    compile_config = CompileConfig(fullgraph=True, backend="eager")
    compile_config._compile_all_devices = True
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = compile_config
    with torch.no_grad():
        compiled = model.generate(IDS, do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode step really was compiled


TOKENS = {"one": 1, "few": 5, "many": SUMMED_TOKENS + 6}  # decode steps sum their small matmuls; longer inputs mm


# which traced forward each layer takes: prepared fp32 layers run the up-projection inside W0's matmul; a prepared
# layer without [W_res | s·B] (a half base, or one cast after prepare) adds it after W0's matmul as the default does
TRACED_PATHS = {"default": "traced_adapter", "prepared": "traced_extended_forward", "prepared-addmm": "traced_adapter"}


@pytest.mark.parametrize("tokens", TOKENS.values(), ids=TOKENS.keys())
@pytest.mark.parametrize("path", TRACED_PATHS)
@pytest.mark.parametrize(("num_experts", "top_k"), EXPERTS_TOPK, ids=[f"E{E}-k{k}" for E, k in EXPERTS_TOPK])
def test_compiled_layer_matches_per_expert_reference(num_experts, top_k, path, tokens, monkeypatch):
    """The traced forward (fused sums, argmax gates, the layer's own factors) judged by the loop reference."""
    layer = trained_like(make_layer("goat", num_experts, top_k)).eval()
    x = torch.randn(tokens, layer.in_features)
    y_ref, _ = reference_goat_forward(
        layer, x, svd_residual(layer.base_layer.weight, layer_config("goat", num_experts, top_k))
    )
    if path != "default":
        prepared_layer_model(layer)
    if path == "prepared-addmm":
        layer.prepared.extended_weight = layer.prepared.router_down = None
    taken = []
    for name in set(TRACED_PATHS.values()):
        traced = getattr(goat_layer_module, name)
        monkeypatch.setattr(goat_layer_module, name, lambda *a, name=name, f=traced: (taken.append(name), f(*a))[1])
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        y = compiled(x)
    assert taken == [TRACED_PATHS[path]]
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())


def test_a_prepared_model_cast_after_prepare_drops_its_extended_weights():
    """A cast replaces each base weight: [W_res | s·B] would be stale, and would keep an fp32 copy of the base alive."""
    model = prepare_for_inference(trained_llama())
    layers = goat_layers(model).values()
    model.float()  # already fp32: the weights stay views of [W_res | s·B]
    assert all(layer.prepared.extended_weight is not None for layer in layers)
    extended = [StorageWeakRef(layer.prepared.extended_weight.untyped_storage()) for layer in layers]
    model.half()
    gc.collect()
    assert all(layer.prepared.extended_weight is None and layer.prepared.router_down is None for layer in layers)
    assert all(storage.expired() for storage in extended)


def test_compiled_layer_never_picks_a_minus_inf_logit():
    """A router row that overflows: the summed logit is -inf, never picked, and never multiplied into the output."""
    layer = trained_like(make_layer("goat", 8, 2)).eval()
    x = torch.ones(3, layer.in_features)
    with torch.no_grad():
        layer.router.weight[0] = -1e38
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")(x)
    assert compiled.isfinite().all()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("num_experts", "top_k"), EXPERTS_TOPK, ids=[f"E{E}-k{k}" for E, k in EXPERTS_TOPK])
def test_argmax_gates_equal_topk_gates(num_experts, top_k):
    logits = torch.randn(50, num_experts, generator=torch.Generator().manual_seed(num_experts + top_k))
    assert torch.equal(fusable_top_k_gates(logits, top_k), top_k_gates(logits, top_k))


def test_argmax_gates_break_ties_towards_the_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    expected = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0]])
    assert torch.equal(fusable_top_k_gates(logits, 2), expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "kernel", "calls"),
    [
        ("default", False, ["matmul", "kernel"]),
        ("prepared", False, ["kernel", "matmul"]),
        ("default", True, ["matmul", "kernel"]),
        ("prepared", True, ["kernel", "matmul"]),
    ],
    ids=["default", "prepared", "cpu-kernel-default", "cpu-kernel-prepared"],
)
def test_inductor_writes_one_kernel_beside_one_matmul_per_layer(path, kernel, calls, monkeypatch):
    """What the compiled decode speed rests on (bench_decode.py --compile): a decode step's layer is one library
    matmul and one generated kernel, after it (default: W0 x + b, then the whole adapter added) or before it (prepared
    fp32: gates and [x; g ⊙ low], then one matmul with [W_res | s·B] and the bias), whether or not the process has
    the CPU kernel: called as an operator from the compiled graph it was slower (serving.md)."""
    if kernel:
        use_cpu_kernel(monkeypatch)
    layer = trained_like(make_layer("goat", 8, 2)).eval()
    if path == "prepared":
        prepared_layer_model(layer)
    with torch.no_grad():
        _, (code,) = run_and_get_code(torch.compile(layer, fullgraph=True), torch.randn(1, 1, layer.in_features))
    called = re.findall(r"(cpp_fused_\w+|extern_kernels\.\w+|torch\.ops\.\w+\.\w+)", code[code.index("def call(") :])
    assert [
        "kernel" if name.startswith("cpp_fused") else "matmul" if "extern" in name else name for name in called
    ] == calls
