"""goat_hf: GOAT (LoRA Mixture-of-Experts with SVD-segment experts, ICML 2025) for the Hugging Face stack."""

__version__ = "0.1.0"

from .adapter_io import GoatAdapterError, load_goat_adapter, save_goat_adapter  # noqa: E402
from .config import GoatConfig  # noqa: E402
from .layer import GoatLinear  # noqa: E402
from .model import (  # noqa: E402
    disable_goat,
    get_goat_model,
    goat_layers,
    print_trainable_parameters,
    trainable_parameter_counts,
    unload_goat,
)

__all__ = [
    "GoatAdapterError",
    "GoatConfig",
    "GoatLinear",
    "disable_goat",
    "get_goat_model",
    "goat_layers",
    "load_goat_adapter",
    "print_trainable_parameters",
    "save_goat_adapter",
    "trainable_parameter_counts",
    "unload_goat",
]
