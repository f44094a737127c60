"""The base layers GOAT can wrap, and their dense weight W0 in fp32, read one layer at a time.

Supported: nn.Linear, and the bitsandbytes layers transformers' `BitsAndBytesConfig` loads (QLoRA-style bases):
`Linear4bit` (NF4 or FP4, double quantisation on or off) and `Linear8bitLt`. The quantized weight is never
changed; the SVD init and the adapter fingerprint read a dequantized copy. Any other quantized layer (GPTQ, AWQ,
HQQ, torchao, ...) is refused before the model changes: its dense weight cannot be read here.

bitsandbytes on CPU repacks a `Linear4bit` for its bf16 inference kernel on the first eval-mode forward without
gradients (e.g. `generate()`): the 4-bit codes move to another layout and the block scales are rounded to bf16.
`dequantize_4bit` then returns garbage, and a repacked layer passes no gradient to its input in training (its
kernel has no backward), which would silently cut the gradient to every adapter below it. So `dense_weight`
decodes the repacked layout too, and `hold_standard_layout` (called at injection) puts a repacked layer back in
the standard layout with the same values and switches the repacking off while GOAT wraps it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor

SUPPORTED = "nn.Linear, bitsandbytes Linear4bit (NF4 or FP4, double quantisation on or off) and Linear8bitLt"
# Attributes by which other libraries' quantized linear layers are recognised (GPTQ/AWQ/Marlin/EETQ: qweight;
# HQQ: W_q); torchao keeps an nn.Linear whose weight is a tensor subclass, caught by the weight check.
FOREIGN_QUANTIZED_ATTRIBUTES = ("qweight", "W_q")


def _bnb_classes() -> tuple[type, type] | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def is_linear4bit(module: nn.Module) -> bool:
    classes = _bnb_classes()
    return classes is not None and isinstance(module, classes[0])


def is_linear8bit(module: nn.Module) -> bool:
    classes = _bnb_classes()
    return classes is not None and isinstance(module, classes[1])


def looks_quantized(module: nn.Module) -> bool:
    """True for a linear layer of some quantization library, supported or not."""
    if is_linear4bit(module) or is_linear8bit(module):
        return True
    if any(hasattr(module, attribute) for attribute in FOREIGN_QUANTIZED_ATTRIBUTES):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and not _plain_float(weight)


def _plain_float(weight: torch.Tensor) -> bool:
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    if isinstance(data, DTensor):  # an FSDP2 shard of a plain weight
        data = data.to_local()
    return type(data) is torch.Tensor and data.is_floating_point()


def check_base_layer(name: str, module: nn.Module) -> None:
    """Refuse a layer GOAT cannot wrap, naming its type and what would work; changes nothing."""
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    if looks_quantized(module) and not (is_linear4bit(module) or is_linear8bit(module)):
        raise ValueError(
            f"Layer {name!r} is a quantized {kind}, which GOAT cannot read the dense weight of (its SVD init "
            f"needs it). Supported layers: {SUPPORTED}. Load the base with transformers' BitsAndBytesConfig "
            "(load_in_4bit=True or load_in_8bit=True), or unquantized, instead."
        )
    if not isinstance(module, nn.Linear):
        return
    if module.weight.device.type == "meta":
        raise ValueError(
            f"Layer {name!r} has its weight on the meta device (a model built under init_empty_weights() or "
            "on torch.device('meta'), or a layer a device_map offloaded to 'disk' or CPU), so there is no W0 to "
            "take the SVD of. Materialise the weights first with model.to_empty(device='cpu') and "
            "model.load_state_dict(...) (or accelerate's load_checkpoint_and_dispatch), or load with a "
            "device_map that keeps every layer on a device (e.g. device_map='cpu', or a 4-bit base to fit), "
            "then call get_goat_model."
        )
    if not (is_linear4bit(module) or is_linear8bit(module)) and not _plain_float(module.weight):
        raise ValueError(f"Layer {name!r} ({kind}) has a {module.weight.dtype} weight; supported: {SUPPORTED}.")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """W0 as a new fp32 [out, in] tensor on the layer's device, exactly as the layer's forward uses it."""
    if is_linear4bit(module):
        return _dense_4bit(module.weight)
    if is_linear8bit(module):
        return _dense_8bit(module)
    return module.weight.detach().to(torch.float32, copy=True)


def fingerprint_weight(module: nn.Module) -> torch.Tensor:
    """W0 as the adapter fingerprint reads it: `dense_weight`, except that a 4-bit layer's block scales are
    rounded to bf16 as bitsandbytes' CPU repacking rounds them, so that a repacked base and a freshly quantized
    one give the same fingerprint."""
    if not is_linear4bit(module):
        return dense_weight(module)
    return _dense_4bit(module.weight, round_scales=True)


def _dense_4bit(weight: torch.Tensor, round_scales: bool = False) -> torch.Tensor:
    import bitsandbytes.functional as bnb_f

    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        codes, state = _unpacked_for_cpu(weight.data, state)  # its scales are bf16 already
    else:
        codes = weight.data
        if round_scales:
            state = _standard_state(state, _block_scales(state).to(torch.bfloat16).to(torch.float32), state.dtype)
    return bnb_f.dequantize_4bit(codes, state).to(torch.float32).reshape(state.shape)


def _block_scales(state) -> torch.Tensor:
    """The fp32 scale of each block, undoing double quantisation as bitsandbytes' dequantize_4bit does."""
    import bitsandbytes.functional as bnb_f

    if not state.nested:
        return state.absmax.to(torch.float32)
    return (bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset).to(torch.float32)


def _standard_state(state, absmax: torch.Tensor, dtype: torch.dtype):
    """A QuantState like `state` with one plain fp32 scale per block (no double quantisation)."""
    import bitsandbytes.functional as bnb_f

    return bnb_f.QuantState(
        absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
        quant_type=state.quant_type, dtype=dtype,
    )  # fmt: skip


def _unpacked_for_cpu(packed: torch.Tensor, state):
    """(codes, QuantState) in the standard layout for a weight bitsandbytes repacked for its CPU kernel.

    The repacked state holds the block scales as bf16 [K / blocksize, N]; they are kept exactly (as fp32, not
    re-quantized), so the result decodes to the same W0 the repacked kernel computes with.
    """
    import bitsandbytes.functional as bnb_f

    layout = copy.copy(state)  # the inverse writes into the state it is given
    layout.original_nested = False  # codes only: the scales are rebuilt below without re-quantizing them
    codes, _ = bnb_f._convert_weight_packed_for_cpu_inverse(packed, layout)
    absmax = state.absmax.to(torch.float32).T.reshape(-1)  # back to one scale per block, in row-major order
    return codes, _standard_state(state, absmax, getattr(state, "original_dtype", torch.float32))


def _dense_8bit(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnb_f

    weight = module.weight
    if weight.dtype != torch.int8:  # has_fp16_weights=True keeps a dense weight
        return weight.detach().to(torch.float32, copy=True)
    # The row scales live on the weight until the first forward, on the layer's state after it.
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return bnb_f.int8_vectorwise_dequant(weight.data, scales).to(torch.float32)


def hold_standard_layout(module: nn.Module) -> bool | None:
    """Keep a Linear4bit trainable under GOAT: undo a CPU repacking, stop the next one; returns the old setting.

    Returns None for any other layer (nothing to hold).
    """
    if not is_linear4bit(module):
        return None
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        codes, state = _unpacked_for_cpu(weight.data, weight.quant_state)
        weight.data, weight.quant_state = codes, state
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = state
    previous = module.support_avx512bf16_for_cpu
    module.support_avx512bf16_for_cpu = False
    return previous


def release_standard_layout(module: nn.Module, previous: bool | None) -> None:
    """Give a Linear4bit back its own repacking setting (the inverse of `hold_standard_layout`)."""
    if previous is not None:
        module.support_avx512bf16_for_cpu = previous


def was_repacked(module: nn.Module) -> bool:
    return is_linear4bit(module) and getattr(module.weight.quant_state, "packing_format_for_cpu", False)
