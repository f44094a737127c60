"""prepare_for_inference: fold the frozen residual into W0 for serving, where W0 itself is never needed again.

The default inference path (goat_hf/decode.py) keeps W0 untouched, so the adapter can still be switched off, unloaded
or trained. A served model needs none of that: W0 can hold W_res = W0 - c·s·B0 A0 (the residual's 2r columns leave
every token's arithmetic), written over W0 in place: no second copy of the base. An fp32 base weight then moves into
[W_res | s·B] (`decode.extend_base_weight_`; W0's own storage is freed), its r extra columns the experts' up-projection,
so that a compiled decode step runs it inside W0's matmul. What needs W0 (disable_goat,
unload_goat, saving the base weights, training) refuses from then on, with a message that says why. The adapter still
saves exactly: its tensors are untouched, and the base fingerprint it records is the one taken before the fold.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter_io import base_tensors
from .cpu_kernel import kernel_for
from .decode import InferenceWeights, attach_kernel_, extend_base_weight_, inference_weights
from .fingerprint import fingerprint_record
from .layer import GoatLinear
from .model import goat_layers, require_goat_state


def prepare_for_inference(model: nn.Module, cpu_kernel: bool = True) -> nn.Module:
    """Fold each GOAT layer's frozen residual into its base weight, in place, and put the model in eval mode.

    Layers that serve from fp32 CPU weights decode through goat_hf's CPU kernel (goat_hf/cpu_kernel.py), as on the
    default path; `cpu_kernel=False` keeps them on ATen ops (an A/B of the kernel).

    Call it last, on the device and dtype the model will serve from: a prepared model moved to another device is
    refused at its next call, and one cast to another dtype drops [W_res | s·B] (its compiled step gets slower). The
    greedy outputs stay those of the unprepared model (fp32 rounding apart); see the module docstring for what a
    prepared model refuses. Calling it again does nothing.
    """
    state = require_goat_state(model)
    if state.prepared_base is not None:
        return model
    layers = goat_layers(model)
    for name, layer in layers.items():
        _check_plain_base(name, layer.base_layer)
    state.prepared_base = fingerprint_record(base_tensors(model))  # of W0: what the adapter was trained on
    model.eval()
    for layer in layers.values():
        layer.prepared = attach_kernel_(
            fold_for_serving(layer), kernel_for(layer.base_layer.weight) if cpu_kernel else None
        )
        layer.base_layer.register_state_dict_pre_hook(_refuse_base_weights)
        layer.requires_grad_(False)
    return model


def is_prepared(model: nn.Module) -> bool:
    state = getattr(model, "goat_state", None)
    return state is not None and state.prepared_base is not None


@torch.no_grad()
def fold_for_serving(layer: GoatLinear) -> InferenceWeights:
    """One layer's serving weights: W0 becomes W_res in place (rounded to W0's dtype; the adapter stays fp32), an
    fp32 W_res the first n columns of [W_res | s·B]. A half base keeps its own storage: [W_res | s·B] in its dtype
    would round the up-projection the eager path computes in fp32."""
    weight = layer.base_layer.weight
    if layer.residual_A is not None:
        W_res = weight.float().addmm(layer.residual_B, layer.residual_A, alpha=layer.correction)  # W0 - c·s·B0 A0
        weight.copy_(W_res)
    weights = inference_weights(layer.router.weight, layer.expert_A, layer.expert_B, None, None, layer.scaling, 0.0)
    if weight.dtype == torch.float32:
        extend_base_weight_(weight, weights)
    return weights


def _check_plain_base(name: str, base: nn.Module) -> None:
    if type(base) is not nn.Linear or not base.weight.dtype.is_floating_point:
        raise ValueError(
            f"prepare_for_inference folds the residual into plain nn.Linear weights; {name} is a "
            f"{type(base).__name__} ({base.weight.dtype}). Serve this model without preparing it: the default "
            "inference path (eval mode or torch.no_grad) needs no preparation."
        )
    if base.weight.is_meta or base.weight.device.type == "meta":
        raise ValueError(f"{name}'s weight is on the meta device (offloaded); load the model fully first.")
    if base.weight.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(
            f"{name}'s weight was made under torch.inference_mode, and torch changes such tensors in place only inside "
            "one; prepare_for_inference folds the residual into it in place: call it inside, as in `with "
            "torch.inference_mode(): prepare_for_inference(model)`."
        )


def _refuse_base_weights(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    raise RuntimeError(
        f"{prefix.rstrip('.') or 'This layer'} was prepared for serving: its weight holds W_res = W0 - c·s·B0 A0, not "
        "the base's W0, so the base weights cannot be saved from this model. Save the adapter with "
        "save_goat_adapter (it is unchanged), and the base from the model it was loaded from."
    )
