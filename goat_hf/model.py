"""Injection: find the target Linears, swap in GoatLinear in place, report, switch off and unload."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .config import GoatConfig
from .distributed import require_whole_weights
from .layer import GoatLinear

logger = logging.getLogger(__name__)

TASK_HEAD_NAMES = ("classifier", "score")  # sequence/image-classification heads in transformers, as in PEFT


@dataclass
class GoatState:
    """What injection leaves on the model (as `model.goat_state`) so that saving and unloading can undo it."""

    config: GoatConfig
    modules_to_save: list[str]
    trainable_before: frozenset[str]
    mask_hook: torch.utils.hooks.RemovableHandle


def get_goat_model(model: nn.Module, config: GoatConfig | None = None) -> nn.Module:
    """Replace the target Linears of `model` with GOAT layers, in place; returns the same object.

    Only the experts, routers and `modules_to_save` (the task head, by default) stay trainable.
    """
    config = config or GoatConfig()
    heads = resolve_modules_to_save(model, config.modules_to_save)
    targets = find_target_linears(model, config, heads)
    require_whole_weights(targets)
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
            len(too_small), config.r, ", ".join(too_small),
        )
    generator = torch.Generator().manual_seed(config.seed)
    layers = {
        name: GoatLinear.from_linear(linear, config, generator)
        for name, linear in targets.items()
        if name not in too_small
    }
    attach_goat_layers(model, config, layers, heads)
    return model


def attach_goat_layers(
    model: nn.Module, config: GoatConfig, layers: dict[str, GoatLinear], modules_to_save: list[str]
) -> None:
    """Swap `layers` in by name, freeze everything else but `modules_to_save`, and record the state."""
    trainable_before = frozenset(name for name, p in model.named_parameters() if p.requires_grad)
    model.requires_grad_(False)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        layer.train(layer.base_layer.training)  # a new module is in train mode: in an eval model, dropout would run
        setattr(model.get_submodule(parent_name), child, layer)
    for name in modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    goat = list(layers.values())
    hook = model.register_forward_pre_hook(_token_mask_hook(goat), with_kwargs=True)
    model.goat_state = GoatState(config, list(modules_to_save), trainable_before, hook)


def _token_mask_hook(layers: list[GoatLinear]):
    """Hands the batch's 2-D attention mask to every layer so that the balance loss skips padding."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        # converted once here rather than in each of the layers
        mask = mask.to(torch.float32) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        for layer in layers:
            layer.token_mask = mask

    return hook


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
    if spec == "all-linear":
        targets = {name: m for name, m in candidates.items() if isinstance(m, nn.Linear)}
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
    not_linear = {name: type(m).__name__ for name, m in targets.items() if not isinstance(m, nn.Linear)}
    if not_linear:
        name, kind = next(iter(not_linear.items()))
        raise ValueError(
            f"target_modules={spec!r} matches {name!r}, a {kind}, not an nn.Linear; GOAT adapts nn.Linear layers "
            "only. Name the Linear layers inside it instead, or use target_modules='all-linear'."
        )
    return targets


@contextlib.contextmanager
def disable_goat(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside this block: every GOAT layer returns W0 x exactly."""
    layers = goat_layers(model).values()
    previous = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, previous, strict=True):
            layer.adapter_enabled = enabled


def unload_goat(model: nn.Module) -> nn.Module:
    """Put the original Linears (W0, untouched) back and restore which parameters were trainable.

    Trained `modules_to_save` (the task head) stay as trained, as in PEFT's `unload()`.
    """
    state = require_goat_state(model)
    for name, layer in goat_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
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
    """"experts", "router" or "head" (a module trained in full) for a trainable parameter's name."""
    if name.endswith((".expert_A", ".expert_B")):
        return "experts"
    return "router" if ".router." in name else "head"


def print_trainable_parameters(model: nn.Module) -> None:
    c = trainable_parameter_counts(model)
    print(
        f"trainable params: {c['trainable']:,} (experts {c['experts']:,} || router {c['router']:,} || "
        f"head {c['head']:,}) || all params: {c['total']:,} || trainable%: {100 * c['trainable'] / c['total']:.4f}"
    )
