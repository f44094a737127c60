"""GOAT adapters on the Hub: resolve a Hub id or folder, and load an adapter together with its base model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import snapshot_download
from torch import nn

from .adapter_io import CONFIG_NAME, WEIGHTS_NAME, GoatAdapterError, load_goat_adapter, read_adapter_config

ADAPTER_FILES = [CONFIG_NAME, WEIGHTS_NAME, "README.md", "*.png"]


def resolve_adapter_folder(adapter: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    """A local adapter folder as is, or a Hub repo id downloaded (or found in the cache when offline)."""
    path = Path(adapter)
    if path.is_dir():
        return path
    return Path(snapshot_download(str(adapter), revision=revision, token=token, allow_patterns=ADAPTER_FILES))


def load_goat_model(
    adapter: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load the base model the adapter was trained on (or `base_model`) and put the adapter on it.

    The base is built with the transformers class recorded in goat_config.json, from the recorded id and
    revision unless `base_model` names another copy (a local folder, say).
    """
    folder = resolve_adapter_folder(adapter, revision=revision, token=token)
    recorded = read_adapter_config(folder)["base_model"]
    base = base_model or recorded.get("name_or_path")
    if base is None:
        raise GoatAdapterError(
            f"The adapter in {folder} does not record its base model; pass base_model='<id or folder>'."
        )
    model_class = getattr(transformers, recorded["architecture"], None)
    if model_class is None:
        raise GoatAdapterError(
            f"This transformers has no class {recorded['architecture']!r}, the adapter's base architecture; "
            "upgrade transformers."
        )
    if base_model is None and recorded.get("revision") and not Path(str(base)).is_dir():
        from_pretrained_kwargs.setdefault("revision", recorded["revision"])
    model = model_class.from_pretrained(base, token=token, **from_pretrained_kwargs)
    return load_goat_adapter(model, folder)
