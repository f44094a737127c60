"""GoatConfig: every choice of the GOAT method in one typed dataclass (DESIGN §2)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

InitMode = Literal["goat", "goat_mini", "pissa", "milora", "random", "zero"]
ScalingMode = Literal["goat", "alpha", "rslora", "aligned"]

INIT_MODES: tuple[str, ...] = ("goat", "goat_mini", "pissa", "milora", "random", "zero")
SCALING_MODES: tuple[str, ...] = ("goat", "alpha", "rslora", "aligned")
SVD_DTYPES: tuple[str, ...] = ("float32", "float64")


@dataclass
class GoatConfig:
    """Configuration of GOAT adapters (Fan et al., ICML 2025, arXiv 2502.16894).

    Defaults are the paper's: 8 experts, top-2 routing, total rank 8, the derived "goat" scaling.
    """

    r: int = field(default=8, metadata={"help": "Total rank over all experts; each expert gets r / num_experts."})
    num_experts: int = field(default=8, metadata={"help": "Number of LoRA experts E per layer."})
    top_k: int = field(default=2, metadata={"help": "Experts each token is routed to (1..num_experts)."})
    init: InitMode = field(
        default="goat",
        metadata={
            "help": "Expert initialisation: 'goat' (SVD segments spread over the spectrum), 'goat_mini' (last "
            "singular triplets of each chunk), 'pissa' (top r), 'milora' (bottom r), 'random' (seeded random "
            "segments), 'zero' (Kaiming A, zero B, no residual).",
            "choices": INIT_MODES,
        },
    )
    scaling: ScalingMode | float = field(
        default="goat",
        metadata={
            "help": "Adapter scaling s: 'goat' = sqrt(3*in_features*eta/d) (Theorem 3.5), 'alpha' = lora_alpha/d, "
            "'rslora' = lora_alpha/sqrt(d), 'aligned' = per layer, so that the first AdamW step changes the "
            "weight eta times as much as full fine-tuning's step at the same lr, or a positive number used as is."
        },
    )
    eta: float = field(
        default=1.0,
        metadata={
            "help": "Full fine-tuning lr / adapter lr, used by the 'goat' and 'aligned' scalings (paper: 0.1 for "
            "LLaMA)."
        },
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "Alpha of the 'alpha' and 'rslora' scalings."})
    rho: float = field(default=10.0, metadata={"help": "Shrinks the SVD segment each expert starts from (rho)."})
    init_cof: float | None = field(
        default=None,
        metadata={"help": "Weight c of the experts removed from the base weight; None means 1/num_experts."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    target_modules: Literal["all-linear"] | list[str] | str = field(
        default="all-linear",
        metadata={
            "help": "'all-linear' (every nn.Linear but the output embeddings and the task head), a list of "
            "module-name suffixes, or a regex matched against full module names."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full and saved with the adapter; None detects the task head "
            "('classifier' or 'score')."
        },
    )
    aux_loss_coef: float = field(default=1e-3, metadata={"help": "Weight of the router balance loss."})
    svd_dtype: Literal["float32", "float64"] = field(
        default="float32",
        metadata={"help": "Precision of the SVD used by the SVD initialisations.", "choices": SVD_DTYPES},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the 'random' and 'zero' initialisations."})

    def __post_init__(self) -> None:
        self._check_types()
        self._check_counts()
        if self.init not in INIT_MODES:
            raise ValueError(f"init={self.init!r} is unknown; choose one of {', '.join(INIT_MODES)}.")
        self._check_scaling()
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout} must be in [0, 1), e.g. 0.05.")
        if self.rho <= 0 or self.eta <= 0:
            raise ValueError(f"rho={self.rho} and eta={self.eta} must both be positive.")
        if self.scaling in ("alpha", "rslora") and self.lora_alpha <= 0:
            raise ValueError(
                f"lora_alpha={self.lora_alpha} must be positive with scaling={self.scaling!r} (s = lora_alpha / d), "
                "e.g. lora_alpha=16."
            )
        if self.svd_dtype not in SVD_DTYPES:
            raise ValueError(f"svd_dtype={self.svd_dtype!r} is unknown; choose 'float32' or 'float64'.")
        if self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef={self.aux_loss_coef} must be >= 0 (0 switches the balance loss off).")
        self._normalise()

    def _normalise(self) -> None:
        if self.init_cof is None:
            self.init_cof = 1.0 / self.num_experts
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]  # one module name, as PEFT accepts it
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def _check_types(self) -> None:
        """Refuse wrong types and non-finite numbers here, before they reach torch or a regex as a riddle."""
        for name in INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}={value!r} must be an int, e.g. {name}={FIELD_DEFAULTS[name]!r}.")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if value is None and name == "init_cof":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}={value!r} must be a number, e.g. {name}={FIELD_DEFAULTS[name]!r}.")
            if not math.isfinite(value):
                raise ValueError(f"{name}={value} is not a finite number; use e.g. {name}={FIELD_DEFAULTS[name]!r}.")
        self._check_module_names("target_modules", self.target_modules, allow_none=False)
        self._check_module_names("modules_to_save", self.modules_to_save, allow_none=True)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as error:
                raise ValueError(
                    f"target_modules={self.target_modules!r} is not a valid regular expression ({error}); give a "
                    "list of module names instead, e.g. ['q_proj', 'v_proj']."
                ) from None

    @staticmethod
    def _check_module_names(name: str, value: Any, allow_none: bool) -> None:
        if value is None and allow_none or isinstance(value, str):
            return
        names_ok = isinstance(value, (list, tuple)) and all(isinstance(item, str) and item for item in value)
        if names_ok and (value or allow_none):  # an empty modules_to_save trains no module in full
            return
        if allow_none:
            raise TypeError(f"{name}={value!r} must be None, a module name or a list of names, e.g. ['classifier'].")
        raise TypeError(
            f"{name}={value!r} must be 'all-linear', a regex or a non-empty list of module names, "
            "e.g. ['q_proj', 'v_proj']."
        )

    def _check_counts(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be at least 1.")
        if self.r < 1 or self.r % self.num_experts:
            valid = ", ".join(str(self.num_experts * i) for i in range(1, 5))
            raise ValueError(
                f"r={self.r} is not a positive multiple of num_experts={self.num_experts}: each expert gets "
                f"r / num_experts ranks. Valid ranks: {valid}, ..."
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}.")

    def _check_scaling(self) -> None:
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (str, int, float)):
            raise ValueError(f"scaling={self.scaling!r} must be one of {', '.join(SCALING_MODES)} or a number.")
        if isinstance(self.scaling, str):
            try:
                self.scaling = float(self.scaling)  # "2.0" from a command line is a fixed scaling
            except ValueError:
                if self.scaling not in SCALING_MODES:
                    raise ValueError(
                        f"scaling={self.scaling!r} is unknown; choose one of {', '.join(SCALING_MODES)} "
                        "or a positive number."
                    ) from None
        if isinstance(self.scaling, (int, float)):
            if not math.isfinite(self.scaling):
                raise ValueError(f"scaling={self.scaling} is not a finite number; use e.g. scaling=2.0 or 'goat'.")
            if self.scaling <= 0:
                raise ValueError(f"scaling={self.scaling} must be positive.")
            self.scaling = float(self.scaling)

    @property
    def expert_rank(self) -> int:
        """Per-expert rank d = r / E."""
        return self.r // self.num_experts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GoatConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"GoatConfig got unknown fields {unknown}; this adapter was probably written by a newer goat_hf. "
                "Upgrade goat_hf to load it."
            )
        return cls(**values)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> GoatConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


INT_FIELDS: tuple[str, ...] = ("r", "num_experts", "top_k", "seed")
FLOAT_FIELDS: tuple[str, ...] = ("eta", "lora_alpha", "rho", "init_cof", "lora_dropout", "aux_loss_coef")
FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(GoatConfig)} | {"init_cof": 0.125}
