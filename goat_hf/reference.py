"""The reference model of preference and RL tuning (DPO, GRPO) without a second copy of the model.

TRL's trainers score each batch twice: with the policy being trained and with a frozen reference. For a PEFT model
they switch the adapter off (or to a frozen "ref" copy of it); for anything else they load a second model. GOAT has
two references that cost (almost) nothing:

- "base": the policy's own forward under `disable_goat`, which is W0 bit for bit;
- "frozen_adapter": the policy's own forward with the trainable tensors (experts, routers, trained heads) swapped
  for a copy taken before training, e.g. an SFT adapter that DPO starts from. The copy is the size of the adapter.

`GoatReferenceModel` stands in for TRL's `ref_model`: TRL calls it like a model and it runs the policy in the
reference state. It owns no parameters, so TRL's preparation of a reference model (device placement, dropout
off) does nothing to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from .model import disable_goat, goat_layers

ReferenceMode = Literal["auto", "base", "frozen_adapter"]
REFERENCE_MODES: tuple[str, ...] = ("auto", "base", "frozen_adapter")


def resolve_reference_mode(mode: str, model_had_goat_layers: bool) -> Literal["base", "frozen_adapter"]:
    """ "auto" is "frozen_adapter" for a model that arrives with GOAT layers (an adapter trained or loaded before, as
    TRL copies a PeftModel's adapter into "ref"), "base" for one the trainer injects."""
    if mode not in REFERENCE_MODES:
        raise ValueError(f"goat_reference={mode!r} is not one of {', '.join(map(repr, REFERENCE_MODES))}.")
    if mode == "auto":
        return "frozen_adapter" if model_had_goat_layers else "base"
    return mode


def trainable_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every trainable tensor (experts, routers, trained heads): the frozen adapter."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


@contextlib.contextmanager
def use_frozen_adapter(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Inside this block the trainable tensors hold the snapshot; the trained values come back on exit.

    The tensors' `.data` is swapped rather than copied into: an in-place copy would bump the version counters of
    tensors the policy's autograd graph saved, and the backward pass would refuse to run.
    """
    params = dict(model.named_parameters())
    swapped = []
    try:
        for name, frozen in snapshot.items():
            param = params[name]
            if frozen.device != param.device:  # moved once, after Trainer placed the model
                snapshot[name] = frozen = frozen.to(param.device)
            swapped.append((param, param.data))
            param.data = frozen.to(param.dtype)
        yield model
    finally:
        for param, trained in swapped:
            param.data = trained


@contextlib.contextmanager
def keep_routing_records(model: nn.Module) -> Iterator[None]:
    """The reference forward runs the routers too (frozen adapter): keep the policy forward's routing records, which
    carry the balance loss, instead of letting the reference pass overwrite them."""
    layers = list(goat_layers(model).values())
    records = [layer.routing for layer in layers]
    try:
        yield
    finally:
        for layer, record in zip(layers, records, strict=True):
            layer.routing = record


class GoatReferenceModel(nn.Module):
    """TRL's `ref_model` for a GOAT policy: calling it runs the policy itself in the reference state, under no_grad.

    mode "base" runs the policy under `disable_goat`; "frozen_adapter" with its trainable tensors swapped for the
    snapshot taken when this object was built.
    """

    def __init__(self, policy: nn.Module, mode: Literal["base", "frozen_adapter"]) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not a submodule: nothing to place, wrap or hash twice
        self.mode = mode
        self.frozen = trainable_snapshot(policy) if mode == "frozen_adapter" else None
        self.config = policy.config  # TRL reads the reference model's config

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward":
            return  # TRL patches its fused LM head onto the reference model's forward; the policy already has it
        super().__setattr__(name, value)

    @contextlib.contextmanager
    def reference_state(self) -> Iterator[nn.Module]:
        """The policy as the reference, without gradients."""
        with torch.no_grad(), keep_routing_records(self.policy):
            if self.mode == "base":
                with disable_goat(self.policy):
                    yield self.policy
            else:
                with use_frozen_adapter(self.policy, self.frozen):
                    yield self.policy

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.reference_state() as policy:
            return policy(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """What the reference computes with (TRL hashes it to name its cache of precomputed log-probabilities)."""
        with self.reference_state() as policy:
            tensors = policy.state_dict()  # detached views of the reference's tensors, valid after the block
        if self.mode == "frozen_adapter":
            return tensors
        # the base: the adapter plays no part, and must not make two references look alike (or different)
        layers = [f"{name}." for name in goat_layers(self.policy)]
        return {key: value for key, value in tensors.items() if not _in_adapter(key, layers)}

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, policy={type(self.policy).__name__}"


def _in_adapter(key: str, layer_prefixes: list[str]) -> bool:
    """Whether a state-dict key is a GOAT layer's own tensor (experts, router, residual), not its base Linear's."""
    return any(key.startswith(prefix) and not key[len(prefix) :].startswith("base_layer.") for prefix in layer_prefixes)
