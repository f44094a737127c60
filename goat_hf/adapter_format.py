"""What an adapter folder holds (DESIGN §4) and the check that goat_config.json really says it, field by field.

Every field is required and type-checked here, once, at the boundary: a file edited by hand, cut short or
written by another program is refused with the field's name instead of failing later as a KeyError.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .config import GoatConfig
from .version import __version__

CONFIG_NAME = "goat_config.json"
WEIGHTS_NAME = "goat_adapter.safetensors"
FORMAT_VERSION = 2  # 2: save id, weights digest and base-tensor fingerprints (goat_hf 0.1 wrote format 1)
SAVE_ID_KEY = "goat_save_id"  # the safetensors metadata entry that pairs the weights with their config


class GoatAdapterError(ValueError):
    """An adapter folder that cannot be loaded onto this model; the message says why and what to do."""


# (accepted types, what the message shows); `int` never accepts a bool.
NUMBER = ((int, float), "a number")
INT = ((int,), "an integer")
TEXT = ((str,), "a string")
OPTIONAL_TEXT = ((str, type(None)), "a string or null")
OBJECT = ((dict,), "an object")
LIST = ((list,), "a list")
BOOL = ((bool,), "true or false")
OPTIONAL_LIST = ((list, type(None)), "a list or null")

TOP_FIELDS = {
    "format_version": INT,
    "goat_hf_version": TEXT,
    "save_id": TEXT,
    "weights_sha256": TEXT,
    "base_model": OBJECT,
    "config": OBJECT,
    "modules_to_save": LIST,
    "layers": OBJECT,
    "base_tensors": OBJECT,
}
BASE_MODEL_FIELDS = {
    "name_or_path": OPTIONAL_TEXT,
    "revision": OPTIONAL_TEXT,
    "architecture": TEXT,
    "model_type": OPTIONAL_TEXT,
}
LAYER_FIELDS = {"in_features": INT, "out_features": INT, "scaling": NUMBER, "residual": BOOL}
BASE_TENSOR_FIELDS = {"shape": LIST, "dtype": TEXT, "fingerprint": OPTIONAL_LIST}
AGAIN = "Save or download the adapter again."


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub id (namespace/name); None for a local folder, a path or free words.

    goat_config.json records the base model this way: an id another machine can load, never a local path (which
    would not exist there, and shows how the trainer's disk is laid out).
    """
    if not name or os.path.isabs(name) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def check_adapter_config(meta: Any, path: str) -> GoatConfig:
    """Check every field of a parsed goat_config.json at `path`; returns its GoatConfig."""
    if not isinstance(meta, dict):
        raise GoatAdapterError(f"{path} is corrupt: it holds a JSON {type(meta).__name__}, not an object. {AGAIN}")
    _check_version(meta, path)
    _check_fields(meta, TOP_FIELDS, "", path)
    _check_fields(meta["base_model"], BASE_MODEL_FIELDS, "base_model.", path)
    for name, info in meta["layers"].items():
        _check_fields(info, LAYER_FIELDS, f"layers[{name!r}].", path)
    for name, info in meta["base_tensors"].items():
        _check_fields(info, BASE_TENSOR_FIELDS, f"base_tensors[{name!r}].", path)
    if not meta["layers"]:
        raise GoatAdapterError(f"{path} names no GOAT layer (field 'layers' is empty). {AGAIN}")
    if not all(isinstance(head, str) for head in meta["modules_to_save"]):
        raise GoatAdapterError(f"{path}: field 'modules_to_save' must be a list of module names. {AGAIN}")
    missing = sorted({f.name for f in dataclasses.fields(GoatConfig)} - set(meta["config"]))
    if missing:
        raise GoatAdapterError(
            f"{path} is incomplete: field 'config' lacks {missing}; nothing is filled in "
            f"with defaults, as they may differ from the training run's. {AGAIN}"
        )
    try:
        return GoatConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as error:
        raise GoatAdapterError(f"{path}: field 'config' is invalid: {error}") from None


def _check_version(meta: dict[str, Any], path: str) -> None:
    if "format_version" not in meta:
        raise GoatAdapterError(f"{path} is corrupt: field 'format_version' is missing. {AGAIN}")
    version = meta["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise GoatAdapterError(f"{path} is corrupt: field 'format_version' is {version!r}, not an integer. {AGAIN}")
    if version > FORMAT_VERSION:
        raise GoatAdapterError(
            f"{path} has adapter format version {version}, newer than this goat_hf {__version__} reads "
            f"(<= {FORMAT_VERSION}); upgrade goat_hf: pip install -U goat_hf."
        )
    if version < FORMAT_VERSION:
        raise GoatAdapterError(
            f"{path} has adapter format version {version} (goat_hf 0.1.0 before its integrity checks), which "
            f"records no save id nor base fingerprints; this goat_hf reads format {FORMAT_VERSION}. Save the "
            "adapter again with this goat_hf (train it again, or load it with goat_hf 0.1.0 and save it here)."
        )


def _check_fields(values: Any, fields: dict[str, tuple], prefix: str, path: str) -> None:
    if not isinstance(values, dict):
        raise GoatAdapterError(f"{path}: field {prefix.rstrip('.')!r} must be an object, not {values!r}. {AGAIN}")
    for name, (types, wanted) in fields.items():
        where = prefix + name
        if name not in values:
            raise GoatAdapterError(f"{path} is incomplete: field {where!r} is missing. {AGAIN}")
        value = values[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise GoatAdapterError(
                f"{path}: field {where!r} is {value!r} ({type(value).__name__}), expected {wanted}. {AGAIN}"
            )
