"""Save and load adapter folders (DESIGN §4): goat_config.json + goat_adapter.safetensors, local folders only.

The weights file holds the experts, routers, task head and the frozen residual factors, so loading rebuilds every
layer exactly with no SVD. A save writes the weights, then the config, each atomically and flushed to the disk;
the config records the save id the weights carry in their metadata and the weights' SHA-256, so a folder whose
save was killed between the two files is refused as incomplete instead of mixing two adapters. Loading checks
every field, every tensor (no extra, none missing, floating point, finite) and the base model's tensors. Only
JSON and safetensors are read: no pickle. Resolving Hub ids sits above this module (hub.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .adapter_format import (
    AGAIN,
    CONFIG_NAME,
    FORMAT_VERSION,
    SAVE_ID_KEY,
    WEIGHTS_NAME,
    GoatAdapterError,
    check_adapter_config,
    hub_id,
)
from .atomic_files import remove_orphans, write_atomically
from .base_weights import fingerprint_weight, looks_quantized
from .config import GoatConfig
from .distributed import copy_full_, full_shape, full_tensor, live_tensors
from .fingerprint import differing_tensors, fingerprint_record
from .layer import GoatLinear
from .model import attach_goat_layers, goat_layers, require_goat_state, require_no_goat, require_unprepared
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "GoatAdapterError"]  # re-exported format names
LAYER_TENSORS = ("expert_A", "expert_B", "router.weight")
RESIDUAL_TENSORS = ("residual_A", "residual_B")


def save_goat_adapter(model: nn.Module, save_directory: str | os.PathLike, *, is_main_process: bool = True) -> Path:
    """Write the adapter (not the base weights) into `save_directory`; returns the folder.

    Refuses an adapter with a NaN or infinite entry: a broken adapter never replaces a good one on disk.
    Under FSDP2 or ZeRO-3 call it on every rank (it gathers the sharded adapter and base tensors) with
    `is_main_process` true on the one rank that writes, as with transformers' `save_pretrained`.
    """
    tensors = {key: full_tensor(value).contiguous().clone() for key, value in adapter_state_dict(model).items()}
    _check_tensors(tensors, "This adapter", "Nothing was saved; the training diverged (see on_nonfinite).")
    # of W0 (gathers a sharded base: on every rank); a prepared model's W0 holds W_res: its record from before
    base = require_goat_state(model).prepared_base or fingerprint_record(base_tensors(model))
    folder = Path(save_directory)
    if not is_main_process:
        return folder
    save_id = uuid.uuid4().hex
    weights = save_safetensors(tensors, metadata={"format": "pt", SAVE_ID_KEY: save_id})
    meta = {
        **adapter_metadata(model),
        "save_id": save_id,
        "weights_sha256": weights_digest(weights),
        "base_tensors": base,
    }
    folder.mkdir(parents=True, exist_ok=True)
    remove_orphans(folder, (WEIGHTS_NAME, CONFIG_NAME))  # left by a save that was killed
    # Weights first, config last: the config names the weights' save id, so a folder caught between the two
    # renames (new weights, old config) is refused as incomplete rather than loaded as a mix.
    write_atomically(folder / WEIGHTS_NAME, weights)
    write_atomically(folder / CONFIG_NAME, (json.dumps(meta, indent=2, allow_nan=False) + "\n").encode())
    return folder


def adapter_metadata(model: nn.Module) -> dict[str, Any]:
    """The facts goat_config.json holds about `model`: format, base model, GoatConfig, heads and layer shapes.

    The base is recorded by its Hub id (`config.name_or_path` when that is one; set it to the id when the model was
    loaded from a local copy), or as null for a local base: a path would not exist on another machine. (A save adds
    its save id, the weights' digest and the base-tensor fingerprints, which verify whichever copy of the base an
    adapter is loaded onto.)
    """
    state = require_goat_state(model)
    layers = {
        name: {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "scaling": layer.scaling,
            "residual": layer.residual_A is not None,
        }
        for name, layer in goat_layers(model).items()
    }
    base_config = getattr(model, "config", None)
    return {
        "format_version": FORMAT_VERSION,
        "goat_hf_version": __version__,
        "base_model": {
            "name_or_path": hub_id(getattr(base_config, "_name_or_path", None)),  # null for a local base
            "revision": getattr(base_config, "_commit_hash", None),
            "architecture": type(model).__name__,
            "model_type": getattr(base_config, "model_type", None),
        },
        "config": state.config.to_dict(),
        "modules_to_save": state.modules_to_save,
        "layers": layers,
    }


def load_goat_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Inject the GOAT layers saved in the local `folder` into a fresh base `model`, in place, exactly as saved.

    Everything is checked before the model is touched, so a refused adapter leaves the model as it was.
    (`goat_hf.load_goat_adapter` takes Hub ids too; it resolves them to a folder and calls this.)
    """
    folder = Path(folder)
    meta = read_adapter_config(folder)
    config = GoatConfig.from_dict(meta["config"])
    tensors = read_adapter_weights(folder, meta)
    require_no_goat(model)
    modules = dict(model.named_modules())
    for name, info in meta["layers"].items():
        _check_base_layer(name, modules.get(name), info, meta["base_model"])
    heads = {name: _head(modules, name, meta["base_model"]) for name in meta["modules_to_save"]}
    expected = {
        f"{name}.{tensor}": _layer_tensor_shape(info, config, tensor)
        for name, info in meta["layers"].items()
        for tensor in LAYER_TENSORS + (RESIDUAL_TENSORS if info["residual"] else ())
    }
    for head, module in heads.items():
        expected |= {f"{head}.{key}": value.shape for key, value in module.state_dict().items()}
    _check_tensor_names(tensors, expected, folder)
    _check_base_tensors(meta, base_tensors(model, meta["modules_to_save"]), folder)
    layers = {}
    for name, info in meta["layers"].items():
        layer = GoatLinear(modules[name], config, info["scaling"], with_residual=info["residual"])
        with torch.no_grad():
            for tensor_name in LAYER_TENSORS + (RESIDUAL_TENSORS if info["residual"] else ()):
                _layer_tensor(layer, tensor_name).copy_(tensors[f"{name}.{tensor_name}"])
        layers[name] = layer
    attach_goat_layers(model, config, layers, meta["modules_to_save"])  # records the heads' base weights first
    with torch.no_grad():
        for head, module in heads.items():
            for key, target in module.state_dict().items():
                target.copy_(tensors[f"{head}.{key}"])
    return model


def restore_goat_weights(model: nn.Module, adapter_folder: str | os.PathLike) -> None:
    """Copy a saved adapter into the GOAT layers `model` already has (resuming, loading the best checkpoint)."""
    folder = Path(adapter_folder)
    require_unprepared(model, "Loading adapter weights into this model")
    meta = read_adapter_config(folder)
    saved = GoatConfig.from_dict(meta["config"])
    if saved != require_goat_state(model).config:
        raise GoatAdapterError(
            f"The adapter in {folder} was trained with another GoatConfig ({saved}) than this model's GOAT layers "
            f"({require_goat_state(model).config}); resume with the settings of that run."
        )
    tensors = read_adapter_weights(folder, meta)
    targets = adapter_state_dict(model)
    _check_tensor_names(tensors, {key: full_shape(value) for key, value in targets.items()}, folder)
    _check_base_tensors(meta, base_tensors(model), folder)
    for key, target in targets.items():
        copy_full_(target, tensors[key])  # a sharded target keeps this rank's part
    for layer in goat_layers(model).values():  # inference tensors copied into in place leave no version trace
        layer.forget_inference_weights()


def check_adapter_folder(folder: str | os.PathLike) -> None:
    """Raise GoatAdapterError unless `folder` holds one complete adapter (config and weights of one save)."""
    folder = Path(folder)
    read_adapter_weights(folder, read_adapter_config(folder))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors an adapter file holds, by the model's own state-dict names."""
    state = require_goat_state(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in goat_layers(model).items():
        names = LAYER_TENSORS + (RESIDUAL_TENSORS if layer.residual_A is not None else ())
        for tensor_name in names:
            tensors[f"{name}.{tensor_name}"] = _layer_tensor(layer, tensor_name)
    for head in state.modules_to_save:
        tensors |= {f"{head}.{key}": value for key, value in live_tensors(model.get_submodule(head)).items()}
    return tensors


def base_tensors(model: nn.Module, modules_to_save: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The base model's tensors by their names without GOAT (W0 of an adapted Linear is `<layer>.weight`).

    Left out: the GOAT tensors and `modules_to_save`, which the adapter file itself holds.
    """
    state = getattr(model, "goat_state", None)
    heads = tuple(f"{head}." for head in (state.modules_to_save if state is not None else modules_to_save or []))
    renamed, goat_own = {}, set()
    for name, layer in goat_layers(model).items():
        for key in layer.state_dict():
            full = f"{name}.{key}"
            if key.startswith("base_layer."):
                renamed[full] = f"{name}.{key.removeprefix('base_layer.')}"
            else:
                goat_own.add(full)
    tensors = {
        renamed.get(key, key): value
        for key, value in live_tensors(model).items()  # sharded ones are gathered when fingerprinted
        if key not in goat_own and not key.startswith(heads)
    }
    # A quantized layer's packed weight and its quantisation state change when bitsandbytes repacks them (and
    # differ before and after injection): compare its dense W0 instead, under the name of its weight.
    dense = {
        renamed.get(f"{name}.weight", f"{name}.weight"): module
        for name, module in model.named_modules()
        if looks_quantized(module) and not isinstance(module, GoatLinear)
    }
    if not dense:
        return tensors

    def packed(key: str) -> bool:  # the weight itself or its quantisation state (`<weight>.absmax`, ...)
        parts = key.split(".")
        return any(".".join(parts[:i]) in dense for i in range(len(parts), 0, -1))

    tensors = {key: value for key, value in tensors.items() if not packed(key)}
    return tensors | {key: fingerprint_weight(module) for key, module in dense.items()}


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """goat_config.json, checked field by field (see adapter_format.py)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise GoatAdapterError(
            f"{folder} is not a GOAT adapter folder: {CONFIG_NAME} is missing. Save one with save_goat_adapter()."
        )
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GoatAdapterError(f"{path} is corrupt ({error}); save or download the adapter again.") from None
    check_adapter_config(meta, str(path))
    return meta


def read_adapter_weights(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of goat_adapter.safetensors, after checking they are the ones its goat_config.json describes."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise GoatAdapterError(f"{path} is missing; the adapter folder is incomplete. {AGAIN}")
    data = path.read_bytes()
    try:
        tensors = load_safetensors(data)
        save_id = _safetensors_metadata(data).get(SAVE_ID_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise GoatAdapterError(
            f"{path} is not a readable safetensors file, probably truncated or corrupt ({error}). {AGAIN}"
        ) from None
    if save_id != meta["save_id"]:
        raise GoatAdapterError(
            f"The adapter in {folder} is incomplete: {WEIGHTS_NAME} comes from another save (save id {save_id}) than "
            f"{CONFIG_NAME} (save id {meta['save_id']}), as when a save is interrupted between its two files. {AGAIN}"
        )
    if weights_digest(data) != meta["weights_sha256"]:
        raise GoatAdapterError(
            f"{path} is corrupt: its SHA-256 differs from the one {CONFIG_NAME} records for it. {AGAIN}"
        )
    _check_tensors(tensors, str(path), AGAIN)
    return tensors


def weights_digest(data: bytes) -> str:
    """The SHA-256 goat_config.json records for its weights file."""
    return hashlib.sha256(data).hexdigest()


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


def _check_tensors(tensors: dict[str, torch.Tensor], where: str, then: str) -> None:
    """Adapter tensors are floating point and finite."""
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise GoatAdapterError(
                f"{where}: tensor {key!r} is {value.dtype}; adapter tensors are floating point. {then}"
            )
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise GoatAdapterError(f"{where}: tensor {key!r} has {bad} NaN or infinite entries. {then}")


def _check_tensor_names(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], folder: Path) -> None:
    """Every tensor the config implies is there with its shape, and the file holds nothing else."""
    for key, shape in expected.items():
        value = tensors.get(key)
        if value is None or value.shape != shape:
            found = "missing" if value is None else f"of shape {tuple(value.shape)}"
            raise GoatAdapterError(
                f"{folder / WEIGHTS_NAME} does not match its {CONFIG_NAME}: {key!r} is {found}, expected "
                f"{tuple(shape)}. {AGAIN}"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise GoatAdapterError(
            f"{folder / WEIGHTS_NAME} holds {len(extra)} tensor(s) its {CONFIG_NAME} does not account for "
            f"(e.g. {extra[:3]}): they would be ignored silently. {AGAIN}"
        )


def _check_base_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """The base here has the tensors (embeddings, norms, W0, lm_head, ...) the adapter was trained on."""
    found = differing_tensors(meta["base_tensors"], tensors)
    made_for = _made_for(meta["base_model"])
    problems = {
        "values": "has other values than",
        "shape": "has another shape than in",
        "missing": "is missing here but part of",
        "extra": "is here but not part of",
    }
    for kind, what in problems.items():
        if found[kind]:
            names = found[kind]
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise GoatAdapterError(
                f"Base tensor {names[0]!r}{more} {what} the base this adapter was trained on ({made_for}). Load the "
                "adapter onto that base model."
            )
    if found["unchecked"]:
        logger.warning(
            "%d base tensor(s) of this model hold no data here (meta device, offloaded?), e.g. %r: they cannot be "
            "compared with the base the adapter in %s was trained on.",
            len(found["unchecked"]),
            found["unchecked"][0],
            folder,
        )


def _made_for(base_model: dict[str, Any]) -> str:
    return f"the adapter was made for {base_model.get('name_or_path') or base_model.get('architecture')}"


def _check_base_layer(name: str, base: nn.Module | None, info: dict[str, Any], base_model: dict[str, Any]) -> None:
    if not isinstance(base, nn.Linear):
        raise GoatAdapterError(f"Adapter layer {name!r} is not an nn.Linear of this model; {_made_for(base_model)}.")
    expected = (info["out_features"], info["in_features"])
    if (base.out_features, base.in_features) != expected:  # not weight.shape: a 4-bit weight is packed
        raise GoatAdapterError(
            f"Layer {name!r} has shape {(base.out_features, base.in_features)} here but {expected} in the adapter; "
            f"{_made_for(base_model)}."
        )


def _head(modules: dict[str, nn.Module], name: str, base_model: dict[str, Any]) -> nn.Module:
    if name not in modules:
        raise GoatAdapterError(
            f"The adapter trained the module {name!r} in full, but this model has no such module; "
            f"{_made_for(base_model)}."
        )
    return modules[name]


def _layer_tensor_shape(info: dict[str, Any], config: GoatConfig, tensor_name: str) -> torch.Size:
    n, m, r = info["in_features"], info["out_features"], config.r
    shapes = {
        "expert_A": (r, n),
        "expert_B": (m, r),
        "router.weight": (config.num_experts, n),
        "residual_A": (r, n),
        "residual_B": (m, r),
    }
    return torch.Size(shapes[tensor_name])


def _layer_tensor(layer: GoatLinear, tensor_name: str) -> torch.Tensor:
    return layer.get_buffer(tensor_name) if tensor_name in RESIDUAL_TENSORS else layer.get_parameter(tensor_name)
