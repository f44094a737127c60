"""The methods of the results comparison: how each turns a fresh base into what its users would train.

LoRA, PiSSA and DoRA are PEFT's, configured as PEFT's users would (`target_modules="all-linear"`, the task head in
`modules_to_save`, α = 2r). MoLoRA and the GOAT variants are goat_hf's and train with GoatTrainer (balance loss,
router groups). Full fine-tuning trains every weight with Trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from goat_hf import GoatConfig


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "full", "peft" or "goat"
    label: str  # what the table shows
    rank: int = 8  # total rank r (LoRA r; GOAT E experts x r/E)
    peft: dict[str, Any] = field(default_factory=dict)  # extra LoraConfig arguments
    goat: dict[str, Any] = field(default_factory=dict)  # GoatConfig arguments
    lr_from: str | None = None  # "full": run at full fine-tuning's chosen lr instead of choosing its own
    grid: str = "adapter"  # which lr grid of the task it sweeps: "adapter" or "full"
    runs_as: str | None = None  # reuse the runs of this method (with lr_from: the same runs read at another lr)
    router_lr: float | None = None  # GOAT: the routers' own lr (None: the swept lr, as the experts')
    head_lr: float | None = None  # GOAT: the task head's own lr (None: the swept lr)

    @property
    def active_rank(self) -> int:
        """Rank of the update one token sees: r for LoRA, k * r / E for a top-k MoE of E experts."""
        if self.kind != "goat":
            return self.rank
        config = self.goat_config(0)
        return config.top_k * config.expert_rank

    def goat_config(self, seed: int) -> GoatConfig:
        return GoatConfig(r=self.rank, seed=seed, **self.goat)


METHODS = {
    method.name: method
    for method in (
        Method("full", "full", "Full fine-tuning", rank=0, grid="full"),
        Method("lora", "peft", "LoRA (PEFT)"),
        Method("pissa", "peft", "PiSSA (PEFT)", peft={"init_lora_weights": "pissa"}),
        Method("dora", "peft", "DoRA (PEFT)", peft={"use_dora": True}),
        Method("molora", "goat", "MoLoRA (init=zero, α/d)", goat={"init": "zero", "scaling": "alpha"}),
        Method("goat", "goat", "GOAT (default)"),
        Method("goat_alpha", "goat", "GOAT, α/d scaling", goat={"scaling": "alpha"}),
        Method("goat_rslora", "goat", "GOAT, α/√d scaling", goat={"scaling": "rslora"}),
        Method("goat_eta01", "goat", "GOAT, η = 0.1", goat={"eta": 0.1}),
        Method("goat_at_full_lr", "goat", "GOAT at full FT's lr (η = 1)", lr_from="full"),
        Method("goat_aligned", "goat", "GOAT, aligned scaling (η = 1)", goat={"scaling": "aligned"}, grid="full"),
        Method(
            "goat_aligned_at_full_lr",
            "goat",
            "GOAT aligned at full FT's lr (η = 1)",
            goat={"scaling": "aligned"},
            lr_from="full",
            runs_as="goat_aligned",
        ),
        Method("goat_dense", "goat", "GOAT, top-8 of 8 (every expert on every token)", goat={"top_k": 8}),
        Method(
            "goat_zero_dense",
            "goat",
            "GOAT machinery, LoRA's init (init=zero, top-8 of 8)",
            goat={"init": "zero", "top_k": 8},
        ),
        Method("goat_rho1", "goat", "GOAT, ρ = 1 (first-order step × √10)", goat={"rho": 1.0}),
        Method("goat_rho100", "goat", "GOAT, ρ = 100 (init perturbation / 10)", goat={"rho": 100.0}),
        Method("goat_slow_router", "goat", "GOAT, router lr 1e-4", router_lr=1e-4),
        Method("goat_head_lr", "goat", "GOAT, classifier head at LoRA's lr 4e-3", head_lr=4e-3),
        Method("goat_pissa", "goat", "GOAT, init=pissa segments", goat={"init": "pissa"}),
        Method("goat_r32", "goat", "GOAT r = 32 (active rank 8)", rank=32),
        Method("lora_r32", "peft", "LoRA (PEFT) r = 32", rank=32),
    )
}


def prepare(method: Method, model: nn.Module, task_type: str) -> nn.Module:
    """The base wrapped as `method` trains it: PEFT model, GOAT-injected model (by the trainer), or itself."""
    if method.kind == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=method.rank,
            lora_alpha=2 * method.rank,
            target_modules="all-linear",
            lora_dropout=0.0,
            task_type=task_type,
            **method.peft,
        )
        return get_peft_model(model, config)
    return model  # GOAT: GoatTrainer injects with the method's GoatConfig; full: everything trains


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
