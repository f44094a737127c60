"""The adapter format (DESIGN §4): goat_config.json + goat_adapter.safetensors, written atomically, read safely.

The file holds the experts, routers, task head and the frozen residual factors, so loading rebuilds every
layer exactly with no SVD. Only JSON and safetensors are read: no pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import GoatConfig
from .distributed import copy_full_, full_tensor
from .layer import GoatLinear
from .model import attach_goat_layers, goat_layers, require_goat_state, require_no_goat

CONFIG_NAME = "goat_config.json"
WEIGHTS_NAME = "goat_adapter.safetensors"
FORMAT_VERSION = 1
LAYER_TENSORS = ("expert_A", "expert_B", "router.weight")
RESIDUAL_TENSORS = ("residual_A", "residual_B")


class GoatAdapterError(ValueError):
    """An adapter folder that cannot be loaded onto this model; the message says why and what to do."""


def save_goat_adapter(model: nn.Module, save_directory: str | os.PathLike, *, is_main_process: bool = True) -> Path:
    """Write the adapter (not the base weights) into `save_directory`; returns the folder.

    Under FSDP2 or ZeRO-3 call it on every rank (it gathers the sharded tensors) with `is_main_process` true on
    the one rank that writes, as with transformers' `save_pretrained`.
    """
    meta = adapter_metadata(model)
    tensors = {key: full_tensor(value).contiguous().clone() for key, value in adapter_state_dict(model).items()}
    folder = Path(save_directory)
    if not is_main_process:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a folder with a config always has complete weights beside it.
    _write_atomically(folder / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    _write_atomically(folder / CONFIG_NAME, lambda path: Path(path).write_text(json.dumps(meta, indent=2) + "\n"))
    return folder


def adapter_metadata(model: nn.Module, *, fingerprints: bool = True) -> dict[str, Any]:
    """What goat_config.json holds for `model`: format, base model, GoatConfig, heads and per-layer facts.

    The W0 fingerprints gather a sharded (FSDP2 / ZeRO-3) weight, a collective; a caller on one rank only (the
    model card) asks for `fingerprints=False`.
    """
    state = require_goat_state(model)
    layers: dict[str, dict[str, Any]] = {}
    for name, layer in goat_layers(model).items():
        layers[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "scaling": layer.scaling,
            "residual": layer.residual_A is not None,
            "base_dtype": str(layer.base_layer.weight.dtype).removeprefix("torch."),
        }
        if fingerprints:
            layers[name]["base_fingerprint"] = weight_fingerprint(layer.base_layer.weight)
    base_config = getattr(model, "config", None)
    return {
        "format_version": FORMAT_VERSION,
        "goat_hf_version": __version__,
        "base_model": {
            "name_or_path": getattr(base_config, "_name_or_path", None) or None,
            "revision": getattr(base_config, "_commit_hash", None),
            "architecture": type(model).__name__,
            "model_type": getattr(base_config, "model_type", None),
        },
        "config": state.config.to_dict(),
        "modules_to_save": state.modules_to_save,
        "layers": layers,
    }


def load_goat_adapter(
    model: nn.Module, adapter: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> nn.Module:
    """Inject the saved GOAT layers into a fresh base `model`, in place, exactly as they were saved.

    `adapter` is a local folder or a Hub repo id (downloaded at `revision`, or found in the cache when offline).
    """
    from .hub import resolve_adapter_folder  # hub.py imports this module

    folder = resolve_adapter_folder(adapter, revision=revision, token=token)
    meta = read_adapter_config(folder)
    config = GoatConfig.from_dict(meta["config"])
    tensors = _read_weights(folder / WEIGHTS_NAME)
    require_no_goat(model)
    modules = dict(model.named_modules())
    layers = {}
    for name, info in meta["layers"].items():
        base = modules.get(name)
        _check_base_layer(name, base, info, meta["base_model"])
        layer = GoatLinear(base, config, info["scaling"], with_residual=info["residual"])
        names = LAYER_TENSORS + (RESIDUAL_TENSORS if info["residual"] else ())
        with torch.no_grad():
            for tensor_name in names:
                target = _layer_tensor(layer, tensor_name)
                target.copy_(_tensor(tensors, f"{name}.{tensor_name}", target.shape, folder))
        layers[name] = layer
    for head in meta["modules_to_save"]:
        module = model.get_submodule(head)
        with torch.no_grad():
            for param_name, target in module.state_dict().items():
                target.copy_(_tensor(tensors, f"{head}.{param_name}", target.shape, folder))
    attach_goat_layers(model, config, layers, meta["modules_to_save"])
    return model


def restore_goat_weights(model: nn.Module, adapter_folder: str | os.PathLike) -> None:
    """Copy a saved adapter into the GOAT layers `model` already has (resuming, loading the best checkpoint)."""
    folder = Path(adapter_folder)
    saved = GoatConfig.from_dict(read_adapter_config(folder)["config"])
    if saved != require_goat_state(model).config:
        raise GoatAdapterError(
            f"The adapter in {folder} was trained with another GoatConfig ({saved}) than this model's GOAT layers "
            f"({require_goat_state(model).config}); resume with the settings of that run."
        )
    tensors = _read_weights(folder / WEIGHTS_NAME)
    for key, target in adapter_state_dict(model).items():
        copy_full_(target, _tensor(tensors, key, target.shape, folder))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors an adapter file holds, by the model's own state-dict names."""
    state = require_goat_state(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in goat_layers(model).items():
        names = LAYER_TENSORS + (RESIDUAL_TENSORS if layer.residual_A is not None else ())
        for tensor_name in names:
            tensors[f"{name}.{tensor_name}"] = _layer_tensor(layer, tensor_name)
    for head in state.modules_to_save:
        module = model.get_submodule(head)
        # the parameters themselves, not state_dict()'s detached copies: ZeRO-3 marks the parameter objects
        live = dict(module.named_buffers()) | dict(module.named_parameters(remove_duplicate=False))
        for param_name in module.state_dict():
            tensors[f"{head}.{param_name}"] = live[param_name]
    return tensors


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """goat_config.json, checked for presence, syntax and format version."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise GoatAdapterError(
            f"{folder} is not a GOAT adapter folder: {CONFIG_NAME} is missing. Save one with save_goat_adapter()."
        )
    try:
        meta = json.loads(path.read_text())
        version = meta["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise GoatAdapterError(f"{path} is corrupt ({error}); save or download the adapter again.") from None
    if version > FORMAT_VERSION:
        raise GoatAdapterError(
            f"{path} has adapter format version {version}, newer than this goat_hf {__version__} reads "
            f"(<= {FORMAT_VERSION}); upgrade goat_hf: pip install -U goat_hf."
        )
    return meta


def weight_fingerprint(weight: torch.Tensor) -> list[float]:
    """Four numbers that change when W0 does: sums of W0 @ p for a fixed +-1 probe p (no hashing of GBs)."""
    weight = full_tensor(weight)  # a sharded W0 is gathered, one layer at a time
    n = weight.shape[1]
    probe = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(n)).to(weight.device) * 2.0 - 1.0
    v = (weight.detach().float() @ probe).double()  # [m]
    return [v.sum().item(), v[::2].sum().item(), v.abs().sum().item(), v.square().sum().sqrt().item()]


def _check_base_layer(name: str, base: nn.Module | None, info: dict[str, Any], base_model: dict[str, Any]) -> None:
    made_for = f"the adapter was made for {base_model.get('name_or_path') or base_model.get('architecture')}"
    if not isinstance(base, nn.Linear):
        raise GoatAdapterError(f"Adapter layer {name!r} is not an nn.Linear of this model; {made_for}.")
    expected = (info["out_features"], info["in_features"])
    if tuple(base.weight.shape) != expected:
        raise GoatAdapterError(
            f"Layer {name!r} has shape {tuple(base.weight.shape)} here but {expected} in the adapter; {made_for}."
        )
    same_dtype = str(base.weight.dtype).removeprefix("torch.") == info["base_dtype"]
    tolerance = 1e-4 if same_dtype else 3e-2  # a bf16 copy of the same base moves the sums by ~0.4 %
    here = torch.tensor(weight_fingerprint(base.weight), dtype=torch.float64)
    saved = torch.tensor(info["base_fingerprint"], dtype=torch.float64)
    # The signed sums can be near 0, where a bf16 copy's rounding is large relative to them: bound it by the
    # largest entry (the sum of |W0 p|) instead.
    atol = (1e-6 if same_dtype else 2e-3) * saved.abs().max().item()
    if not torch.allclose(here, saved, rtol=tolerance, atol=atol):
        raise GoatAdapterError(
            f"Layer {name!r} has other weights than the base this adapter was trained on ({made_for}). "
            "Load the adapter onto that base model."
        )


def _layer_tensor(layer: GoatLinear, tensor_name: str) -> torch.Tensor:
    return layer.get_buffer(tensor_name) if tensor_name in RESIDUAL_TENSORS else layer.get_parameter(tensor_name)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise GoatAdapterError(f"{path} is missing; the adapter folder is incomplete. Save or download it again.")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise GoatAdapterError(
            f"{path} is not a readable safetensors file, probably truncated or corrupt ({error}). "
            "Save or download the adapter again."
        ) from None


def _tensor(tensors: dict[str, torch.Tensor], key: str, shape: torch.Size, folder: Path) -> torch.Tensor:
    value = tensors.get(key)
    if value is None or value.shape != shape:
        found = "missing" if value is None else f"of shape {tuple(value.shape)}"
        raise GoatAdapterError(
            f"{folder / WEIGHTS_NAME} does not match its {CONFIG_NAME}: {key!r} is {found}, expected "
            f"{tuple(shape)}. Save or download the adapter again."
        )
    return value


def _write_atomically(path: Path, write) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
