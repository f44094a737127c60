"""GoatTrainingArguments: TrainingArguments plus every GoatConfig field, so HfArgumentParser scripts get the flags.

The GOAT fields are generated from GoatConfig (one default and one help text per setting): `--goat_r`,
`--goat_num_experts`, `--goat_top_k`, `--goat_init`, ... and `--aux_loss_coef`, plus the router's optimizer
settings, which belong to training rather than to the adapter.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from transformers import TrainingArguments

from .config import GoatConfig
from .step_guard import NONFINITE_MODES, NonFiniteMode, check_nonfinite_mode

# GoatConfig fields whose Python type HfArgumentParser cannot parse, with the command-line type used instead.
_CLI_TYPES: dict[str, Any] = {"scaling": str, "target_modules": list[str], "modules_to_save": list[str] | None}
_UNPREFIXED = ("aux_loss_coef",)


def _flag_name(config_field: str) -> str:
    return config_field if config_field in _UNPREFIXED else f"goat_{config_field}"


def _goat_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    generated = []
    types = typing.get_type_hints(GoatConfig)
    for f in dataclasses.fields(GoatConfig):
        default = f.default
        if f.name == "target_modules":
            default = dataclasses.field(default_factory=lambda: ["all-linear"], metadata=f.metadata)
        else:
            default = dataclasses.field(default=default, metadata=f.metadata)
        generated.append((_flag_name(f.name), _CLI_TYPES.get(f.name, types[f.name]), default))
    return generated


def _to_goat_config(self: TrainingArguments) -> GoatConfig:
    """The GoatConfig these arguments describe (validated by GoatConfig itself)."""
    values = {f.name: getattr(self, _flag_name(f.name)) for f in dataclasses.fields(GoatConfig)}
    if values["target_modules"] == ["all-linear"]:
        values["target_modules"] = "all-linear"
    return GoatConfig(**values)


def _post_init(self: TrainingArguments) -> None:
    TrainingArguments.__post_init__(self)
    check_nonfinite_mode(self.on_nonfinite)
    self.to_goat_config()  # fail at parse time, with GoatConfig's message, not at the first step


GoatTrainingArguments = dataclasses.make_dataclass(
    "GoatTrainingArguments",
    [
        *_goat_fields(),
        (
            "router_learning_rate",
            float | None,
            dataclasses.field(default=None, metadata={"help": "Learning rate of the routers; None = learning_rate."}),
        ),
        (
            "head_learning_rate",
            float | None,
            dataclasses.field(
                default=None,
                metadata={
                    "help": "Learning rate of the fully trained modules (modules_to_save, e.g. a new classifier "
                    "head); None = learning_rate."
                },
            ),
        ),
        (
            "router_weight_decay",
            float,
            dataclasses.field(default=0.0, metadata={"help": "Weight decay of the routers (none by default)."}),
        ),
        (
            "on_nonfinite",
            NonFiniteMode,
            dataclasses.field(
                default="stop",
                metadata={
                    "help": "A step whose loss or gradients hold NaN or inf: 'stop' raises an error naming the step "
                    "(before the adapters take it); 'skip' skips that step with a warning.",
                    "choices": NONFINITE_MODES,
                },
            ),
        ),
    ],
    bases=(TrainingArguments,),
    namespace={"to_goat_config": _to_goat_config, "__post_init__": _post_init},
)
GoatTrainingArguments.__module__ = __name__
GoatTrainingArguments.__doc__ = (
    "TrainingArguments with the GOAT flags (`--goat_r`, `--goat_num_experts`, `--aux_loss_coef`, "
    "`--router_learning_rate`, `--head_learning_rate`, ...); `to_goat_config()` gives the GoatConfig they describe."
)
