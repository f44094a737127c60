"""Injection: find the target Linears, swap in GoatLinear in place, report, switch off and unload."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .base_weights import check_base_layer, hold_standard_layout, looks_quantized, release_standard_layout, was_repacked
from .config import GoatConfig
from .distributed import require_whole_weights
from .layer import GoatLinear
from .routing_record import RoutingRequests

logger = logging.getLogger(__name__)

TASK_HEAD_NAMES = ("classifier", "score")  # sequence/image-classification heads in transformers, as in PEFT


@dataclass
class GoatState:
    """What injection leaves on the model (as `model.goat_state`) so that saving and unloading can undo it."""

    config: GoatConfig
    modules_to_save: list[str]
    trainable_before: frozenset[str]
    mask_hook: torch.utils.hooks.RemovableHandle
    base_heads: dict[str, dict[str, torch.Tensor]]  # the base's own modules_to_save tensors, for disable_goat
    base_settings: dict[str, bool | None] = field(default_factory=dict)  # what hold_standard_layout changed
    prepared_base: dict | None = None  # prepare_for_inference: the base fingerprint taken before W0 held W_res


def get_goat_model(model: nn.Module, config: GoatConfig | None = None) -> nn.Module:
    """Replace the target Linears of `model` with GOAT layers, in place; returns the same object.

    Only the experts, routers and `modules_to_save` (the task head, by default) stay trainable.
    """
    config = config or GoatConfig()
    heads = resolve_modules_to_save(model, config.modules_to_save)
    targets = find_target_linears(model, config, heads)
    too_small = [name for name, linear in targets.items() if min(linear.in_features, linear.out_features) < config.r]
    if len(too_small) == len(targets):
        largest = max(min(linear.in_features, linear.out_features) for linear in targets.values())
        raise ValueError(
            f"r={config.r} is larger than min(in_features, out_features) of every targeted layer (the largest is "
            f"{largest}); use r <= {largest - largest % config.num_experts}, a multiple of num_experts."
        )
    if too_small:
        logger.warning(
            "GOAT skips %d layer(s) with min(in, out) < r=%d, as the reference does: %s",
            len(too_small),
            config.r,
            ", ".join(too_small),
        )
    generator = torch.Generator().manual_seed(config.seed)
    todo = {name: linear for name, linear in targets.items() if name not in too_small}
    progress = hf_logging.tqdm(todo.items(), desc="GOAT init", unit="layer", disable=len(todo) < 2 or None)
    layers = {name: GoatLinear.from_linear(linear, config, generator) for name, linear in progress}
    attach_goat_layers(model, config, layers, heads)
    return model


def attach_goat_layers(
    model: nn.Module, config: GoatConfig, layers: dict[str, GoatLinear], modules_to_save: list[str]
) -> None:
    """Swap `layers` in by name, freeze everything else but `modules_to_save`, and record the state."""
    trainable_before = frozenset(name for name, p in model.named_parameters() if p.requires_grad)
    repacked = [name for name, layer in layers.items() if was_repacked(layer.base_layer)]
    if repacked:
        logger.warning(
            "%d Linear4bit layer(s) had been repacked by bitsandbytes for its CPU inference kernel (an eval-mode "
            "forward without gradients, e.g. generate(), ran before injection). A repacked layer passes no gradient "
            "to its input, so GOAT put them back in the standard 4-bit layout, with the same values (bf16 block "
            "scales, as the repacking rounded them): %s",
            len(repacked),
            ", ".join(repacked),
        )
    base_settings = {name: hold_standard_layout(layer.base_layer) for name, layer in layers.items()}
    model.requires_grad_(False)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        layer.train(layer.base_layer.training)  # a new module is in train mode: in an eval model, dropout would run
        setattr(model.get_submodule(parent_name), child, layer)
    base_heads = {}
    for name in modules_to_save:
        head = model.get_submodule(name)
        head.requires_grad_(True)
        base_heads[name] = {key: value.detach().clone() for key, value in head.state_dict().items()}
    hook = model.register_forward_pre_hook(TokenMaskHook(model, list(layers.values())), with_kwargs=True)
    model.goat_state = GoatState(config, list(modules_to_save), trainable_before, hook, base_heads, base_settings)


MASK_ARGUMENTS = ("attention_mask", "decoder_attention_mask")


class TokenMaskHook:
    """A forward pre-hook that hands the batch's 2-D padding mask to the layers, so that the balance loss skips padding.

    The mask is read by keyword or by position. In an encoder-decoder, the encoder's layers get
    `attention_mask` and the decoder's `decoder_attention_mask` (None: every target token counts), whatever
    the two lengths; each layer then applies it only to an input of the mask's shape (see GoatLinear).
    Only a routing record reads the mask: without gradients, while no layer records routing, the hook leaves the
    layers alone (a decoded token would otherwise pay ~200 module setattrs, ~0.4 ms). It does not clear them either:
    a no-grad forward between a training forward and its backward (TRL's reference pass) must not change what
    gradient checkpointing recomputes, and every forward that records sets the masks anew.
    A class rather than a closure, so that a model with GOAT layers pickles (torch.save of the whole model).
    """

    def __init__(self, model: nn.Module, layers: list[GoatLinear]) -> None:
        self.positions = _argument_positions(model.forward, MASK_ARGUMENTS)
        encoder = model.get_encoder() if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else None
        in_encoder = {id(m) for m in encoder.modules()} if encoder is not None and encoder is not model else None
        self.groups = {"attention_mask": layers}
        if in_encoder is not None:
            self.groups = {
                "attention_mask": [layer for layer in layers if id(layer) in in_encoder],
                "decoder_attention_mask": [layer for layer in layers if id(layer) not in in_encoder],
            }
        # one count for all the layers (RoutingRequests): the hook reads one value, not a flag on each layer
        self.routing_requests = RoutingRequests()
        for layer in layers:
            self.routing_requests.add(layer.record_routing)
            layer.routing_requests = self.routing_requests

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not (torch.is_grad_enabled() or self.routing_requests.active):
            return
        for name, group in self.groups.items():
            mask = kwargs.get(name)
            if mask is None and name in self.positions and self.positions[name] < len(args):
                mask = args[self.positions[name]]
            # converted once here rather than in each of the layers
            mask = mask.to(torch.float32) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            for layer in group:
                layer.token_mask = mask


def _argument_positions(forward, names: tuple[str, ...]) -> dict[str, int]:
    """Positions of `names` among the leading positional parameters of `forward` (for `model(ids, mask)`)."""
    positions = {}
    for index, parameter in enumerate(inspect.signature(forward).parameters.values()):
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        if parameter.name in names:
            positions[parameter.name] = index
    return positions


def goat_layers(model: nn.Module) -> dict[str, GoatLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, GoatLinear)}


def require_no_goat(model: nn.Module) -> None:
    if goat_layers(model):
        raise ValueError(
            "This model already has GOAT layers; unload_goat(model) first, or keep training the ones it has."
        )


def require_goat_state(model: nn.Module) -> GoatState:
    state = getattr(model, "goat_state", None)
    if state is None:
        raise ValueError("This model has no GOAT layers; call get_goat_model(model, GoatConfig()) first.")
    return state


def require_unprepared(model: nn.Module, action: str) -> None:
    state = getattr(model, "goat_state", None)
    if state is not None and state.prepared_base is not None:
        raise RuntimeError(
            f"{action} needs the base weights W0, and this model was prepared for serving: prepare_for_inference "
            "folded the frozen residual into them (they hold W_res = W0 - c·s·B0 A0). Load the adapter onto a fresh "
            "base (load_goat_model) for that."
        )


def resolve_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    """Full module names trained in full; None detects the task head as PEFT does for classification."""
    modules = dict(model.named_modules())
    if names is None:
        return [name for name in TASK_HEAD_NAMES if name in modules]
    resolved = []
    for wanted in names:
        found = [name for name in modules if name and (name == wanted or name.endswith("." + wanted))]
        if not found:
            raise ValueError(f"modules_to_save entry {wanted!r} matches no module of {type(model).__name__}.")
        resolved += found
    return resolved


def find_target_linears(model: nn.Module, config: GoatConfig, heads: list[str]) -> dict[str, nn.Linear]:
    """The modules GOAT adapts, by full name; errors name the pattern and what would match."""
    require_no_goat(model)
    in_head = [re.compile(re.escape(head) + r"(\..*)?$") for head in heads]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    candidates = {
        name: module
        for name, module in model.named_modules()
        if name and not any(p.match(name) for p in in_head) and module is not output
    }
    spec = config.target_modules
    if spec == "all-linear":  # quantized layers of other libraries too, to refuse them by name below
        targets = {name: m for name, m in candidates.items() if isinstance(m, nn.Linear) or looks_quantized(m)}
    elif isinstance(spec, list):
        targets = {n: m for n, m in candidates.items() if any(n == t or n.endswith("." + t) for t in spec)}
    else:
        targets = {n: m for n, m in candidates.items() if re.fullmatch(spec, n)}
    if not targets:
        linear_names = sorted({name.rsplit(".", 1)[-1] for name, m in candidates.items() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"target_modules={spec!r} matches no module of {type(model).__name__} (the task head and output "
            f"embeddings are never targets). Its Linear layers are named: {', '.join(linear_names) or 'none'}."
        )
    require_whole_weights(targets)  # first: a sharded weight would read as an unknown quantized one below
    for name, module in targets.items():
        check_base_layer(name, module)
    not_linear = {name: type(m).__name__ for name, m in targets.items() if not isinstance(m, nn.Linear)}
    if not_linear:
        name, kind = next(iter(not_linear.items()))
        raise ValueError(
            f"target_modules={spec!r} matches {name!r}, a {kind}, not an nn.Linear; GOAT adapts nn.Linear layers "
            "only. Name the Linear layers inside it instead, or use target_modules='all-linear'."
        )
    return targets


@contextlib.contextmanager
def trainer_accepts_quantized_base(model: nn.Module) -> Iterator[None]:
    """While a transformers Trainer is built: let it accept a quantized base that carries GOAT layers.

    Trainer refuses a quantized model without adapters ("purely quantized"), and it knows adapters only by PEFT's
    `_hf_peft_config_loaded` flag; the flag is raised just for the check, since save_pretrained reads it too.
    """
    raise_flag = getattr(model, "is_quantized", False) and getattr(model, "goat_state", None) is not None
    previous = getattr(model, "_hf_peft_config_loaded", False)
    if raise_flag:
        model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if raise_flag:
            model._hf_peft_config_loaded = previous


def keep_goat_in_fp32(model: nn.Module) -> None:
    """Cast the experts, routers and frozen residual factors back to fp32 (DESIGN §2): after `model.to(dtype)`,
    which casts them with the base, or after TRL cast a quantized model's trainable parameters to bf16, as QLoRA
    does for LoRA. Training refuses non-fp32 experts; inference computes them in fp32 as they are."""
    for layer in goat_layers(model).values():
        for tensor in (layer.expert_A, layer.expert_B, layer.router.weight, layer.residual_A, layer.residual_B):
            if tensor is not None:
                tensor.data = tensor.data.to(torch.float32)


@contextlib.contextmanager
def disable_goat(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside this block, as PEFT's `disable_adapter()`: every GOAT layer returns W0 x
    exactly and every `modules_to_save` (the trained task head) holds the base's own weights again."""
    require_unprepared(model, "disable_goat")
    layers = goat_layers(model).values()
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    swapped = _swap_heads(model)
    try:
        yield model
    finally:
        for tensor, trained in swapped:
            tensor.data = trained
        for layer, enabled in zip(layers, previous, strict=True):
            layer.adapter_enabled = enabled


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[nn.Module]:
    """Keep each GOAT layer's routing record (`layer.routing`) in evaluation and under `torch.no_grad()` too.

    Outside training with grad the layers record nothing (the forward is W0 x plus the gated term, no balance loss
    and no routing record, so evaluation and `generate` cost what LoRA's do); this block asks for the record, e.g.
    to look at which experts a prompt's tokens went to.
    """
    layers = goat_layers(model).values()
    previous = [layer.record_routing for layer in layers]
    for layer in layers:
        layer.record_routing = True
    try:
        yield model
    finally:
        for layer, recording in zip(layers, previous, strict=True):
            layer.record_routing = recording


def _swap_heads(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Point each head tensor at the base's copy (on its device and dtype); returns (tensor, trained data)."""
    state = getattr(model, "goat_state", None)
    swapped = []
    for name, base in (state.base_heads if state is not None else {}).items():
        for key, tensor in model.get_submodule(name).state_dict(keep_vars=True).items():
            swapped.append((tensor, tensor.data))
            tensor.data = base[key].to(device=tensor.device, dtype=tensor.dtype)
    return swapped


def unload_goat(model: nn.Module) -> nn.Module:
    """Put the original Linears (W0, untouched) back and restore which parameters were trainable.

    Trained `modules_to_save` (the task head) stay as trained, as in PEFT's `unload()`.
    """
    state = require_goat_state(model)
    require_unprepared(model, "unload_goat")
    for name, layer in goat_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
        release_standard_layout(layer.base_layer, state.base_settings.get(name))
    state.mask_hook.remove()
    for name, param in model.named_parameters():
        param.requires_grad_(name in state.trainable_before)
    del model.goat_state
    return model


def trainable_parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters by kind: experts (A, B), router, head (modules_to_save), and the totals."""
    counts = {"experts": 0, "router": 0, "head": 0, "trainable": 0, "total": 0}
    for name, param in model.named_parameters():
        counts["total"] += param.numel()
        if not param.requires_grad:
            continue
        counts["trainable"] += param.numel()
        counts[parameter_kind(name)] += param.numel()
    return counts


def parameter_kind(name: str) -> str:
    """ "experts", "router" or "head" (a module trained in full) for a trainable parameter's name."""
    if name.endswith((".expert_A", ".expert_B")):
        return "experts"
    return "router" if ".router." in name else "head"


def print_trainable_parameters(model: nn.Module) -> None:
    c = trainable_parameter_counts(model)
    print(
        f"trainable params: {c['trainable']:,} (experts {c['experts']:,} || router {c['router']:,} || "
        f"head {c['head']:,}) || all params: {c['total']:,} || trainable%: {100 * c['trainable'] / c['total']:.4f}"
    )
