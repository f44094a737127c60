"""Serve a GOAT adapter over HTTP with `transformers serve`: a folder its AutoModelForCausalLM loads.

`transformers serve` builds a model with the transformers class that config.json names in `architectures` (a plain
Llama, without the adapter), or with AutoModelForCausalLM when it names none. So `export_for_serving` writes a folder
whose config.json names no architecture but a model type of its own, with an `auto_map` that points AutoConfig and
AutoModelForCausalLM at goat_modeling.py in the folder (run with --trust-remote-code). That file only imports the two
classes below from goat_hf (which must be installed where the server runs). Loading the folder loads the base model,
puts the adapter on it exactly (`load_goat_model`: its base fingerprints are checked) and prepares it for serving
(`prepare_for_inference`). The config class is ours, not the base's, so that registering it with the Auto classes
does not redirect every LlamaConfig to this loader. The base weights are not copied: the folder records the base's
Hub id (the adapter's record) or the local folder given as `base_model`, which must exist where the server runs.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .adapter_format import CONFIG_NAME, WEIGHTS_NAME, GoatAdapterError, hub_id
from .adapter_io import adapter_metadata, read_adapter_config, save_goat_adapter
from .hub import load_goat_model, resolve_adapter_folder
from .model import require_goat_state
from .prepare import prepare_for_inference

logger = logging.getLogger(__name__)

SERVING_MODEL_TYPE = "goat_causal_lm"
MODELING_FILE = "goat_modeling.py"
MODELING_SOURCE = '''"""Written by goat_hf.export_for_serving: AutoModelForCausalLM loads the base model, puts the GOAT
adapter in this folder on it and prepares it for serving (goat_hf must be installed where the folder is served)."""

from goat_hf.serving import GoatForServing, GoatServingConfig

__all__ = ["GoatForServing", "GoatServingConfig"]
'''
AUTO_MAP = {
    "AutoConfig": f"{MODELING_FILE[:-3]}.GoatServingConfig",
    "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.GoatForServing",
}
# What the base's from_pretrained takes of what AutoModelForCausalLM and `transformers serve` pass to ours; the rest
# (the revision of the exported folder, trust_remote_code, ...) is about the folder, not the base.
BASE_LOADING_KWARGS = (
    "dtype",
    "device_map",
    "attn_implementation",
    "quantization_config",
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "tqdm_class",
)


class GoatServingConfig(PretrainedConfig):
    """The base model's config fields (context length, vocabulary, special tokens: what a server reads) under a model
    type of goat_hf's own, plus where the base model is: `goat_base_model` (a Hub id or a local folder), or None for
    the Hub id the adapter records."""

    model_type = SERVING_MODEL_TYPE

    def __init__(self, goat_base_model: str | None = None, **base_fields: Any) -> None:
        self.goat_base_model = goat_base_model
        super().__init__(**base_fields)


class GoatForServing(PreTrainedModel):
    """AutoModelForCausalLM's entry for an exported folder: `from_pretrained` returns the base model (its own
    transformers class) with the folder's GOAT adapter on it, prepared for serving. Never instantiated itself."""

    config_class = GoatServingConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "GoatForServing only loads an exported folder: AutoModelForCausalLM.from_pretrained(folder, "
            "trust_remote_code=True), or transformers serve <folder> --trust-remote-code."
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, config: Any = None, **kwargs: Any
    ) -> PreTrainedModel:
        """Load the base and the adapter of the exported folder (local or a Hub repo), then prepare it to serve."""
        if config is None:
            config = GoatServingConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
        base_kwargs = {name: kwargs[name] for name in BASE_LOADING_KWARGS if kwargs.get(name) is not None}
        model = load_goat_model(
            pretrained_model_name_or_path,
            config.goat_base_model,
            revision=kwargs.get("revision"),
            token=kwargs.get("token"),
            **base_kwargs,
        )
        if "quantization_config" in base_kwargs:  # a 4-bit or 8-bit base has no W0 to fold into: the default path
            return model.eval()
        return prepare_for_inference(model)


def export_for_serving(
    model_or_adapter: nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    base_model: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """Write a folder that `transformers serve <folder> --trust-remote-code` serves: a trained causal LM's adapter.

    `model_or_adapter` is a causal LM with GOAT layers, or an adapter folder or Hub id (at `revision`). `base_model`
    (a Hub id or a local folder) replaces the base the adapter records; it is needed when the base was a local
    folder. `tokenizer` (an object, a folder or a Hub id; default: the base's) goes into the folder with its chat
    template, and so does the generation config. The base weights are not copied. Returns the folder.
    """
    output = Path(output_dir)
    if isinstance(model_or_adapter, nn.Module):
        require_goat_state(model_or_adapter)
        meta = adapter_metadata(model_or_adapter)
        source: Path | None = None
    else:
        source = resolve_adapter_folder(model_or_adapter, revision=revision, token=token)
        meta = read_adapter_config(source)
    recorded = meta["base_model"]
    _check_causal_lm(recorded["architecture"])
    base = _base_reference(model_or_adapter, base_model, recorded)
    base_config, generation_config = _base_configs(model_or_adapter, base, recorded, token)
    tokenizer = _load_tokenizer(tokenizer, base, token)

    output.mkdir(parents=True, exist_ok=True)
    if source is None:
        save_goat_adapter(model_or_adapter, output)
    elif source.resolve() != output.resolve():
        for name in (WEIGHTS_NAME, CONFIG_NAME):  # weights first, as a save writes them
            shutil.copyfile(source / name, output / name)
    fields = {k: v for k, v in base_config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    config = GoatServingConfig(goat_base_model=None if base == recorded["name_or_path"] else base, **fields)
    config.auto_map = AUTO_MAP
    # Not save_pretrained: once a folder was loaded in this process, the class is registered for AutoConfig and
    # save_pretrained would copy goat_hf's own modules into the folder and point auto_map at them.
    config.to_json_file(output / "config.json")
    generation_config.save_pretrained(output)
    tokenizer.save_pretrained(output)
    (output / MODELING_FILE).write_text(MODELING_SOURCE)
    return output


def _check_causal_lm(architecture: str) -> None:
    if architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise GoatAdapterError(
            f"export_for_serving serves causal language models (text generation), and this adapter's base is a "
            f"{architecture}. Run it in-process instead, e.g. transformers.pipeline(..., model=model)."
        )


def _base_reference(model_or_adapter: Any, base_model: str | os.PathLike | None, recorded: dict[str, Any]) -> str:
    """The base as the folder records it: `base_model`, else the adapter's Hub id, else a model's own local folder;
    a local folder as an absolute path (the server may run from elsewhere)."""
    if base_model is None and isinstance(model_or_adapter, nn.Module) and recorded["name_or_path"] is None:
        name = getattr(getattr(model_or_adapter, "config", None), "_name_or_path", "")
        base_model = name if name and os.path.isdir(name) else None
    base = str(base_model) if base_model is not None else recorded["name_or_path"]
    if base is None:
        raise GoatAdapterError(
            f"This adapter was trained on a local {recorded['architecture']} and records no Hub id for its base; pass "
            "base_model='<Hub id or local folder>' (the folder the server loads the base weights from)."
        )
    if hub_id(base) is None and not os.path.isdir(base):
        raise GoatAdapterError(f"base_model={base!r} is neither a local folder nor a Hub id (namespace/name).")
    return base if hub_id(base) else str(Path(base).resolve())


def _base_configs(
    model_or_adapter: Any, base: str, recorded: dict[str, Any], token: str | None
) -> tuple[PretrainedConfig, GenerationConfig]:
    """The base's config and generation config: a model's own, else read from the base (a folder, or the Hub)."""
    if isinstance(model_or_adapter, nn.Module):
        return model_or_adapter.config, model_or_adapter.generation_config
    revision = recorded["revision"] if base == recorded["name_or_path"] else None
    try:
        config = AutoConfig.from_pretrained(base, revision=revision, token=token)
    except OSError as error:
        raise GoatAdapterError(
            f"Cannot read the base model's config from {base!r} ({error}). Pass base_model='<local folder>' with "
            "a copy of the base, or download it once while online."
        ) from error
    try:
        generation_config = GenerationConfig.from_pretrained(base, revision=revision, token=token)
    except OSError:  # the base has none: generate's defaults from its config, as from_pretrained does
        generation_config = GenerationConfig.from_model_config(config)
    return config, generation_config


def _load_tokenizer(
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None, base: str, token: str | None
) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        loaded = tokenizer
    else:
        where = str(tokenizer) if tokenizer is not None else base
        try:
            loaded = AutoTokenizer.from_pretrained(where, token=token)
        except (OSError, ValueError) as error:
            raise GoatAdapterError(
                f"No tokenizer could be loaded from {where!r} (the cause is shown above), and the server needs one: "
                "pass tokenizer=<the tokenizer you trained with, or its folder or Hub id>."
            ) from error
    if loaded.chat_template is None:
        logger.warning(
            "The tokenizer has no chat template: the server will refuse /v1/chat/completions and answer "
            "/v1/completions only. Set tokenizer.chat_template before exporting to serve chats."
        )
    return loaded
