"""Model cards for GOAT adapters: huggingface_hub.ModelCard filled from the template in model_cards/."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .adapter_format import hub_id
from .adapter_io import CONFIG_NAME, adapter_metadata, read_adapter_config
from .config import GoatConfig
from .heatmap import PILLOW_MISSING, draw_load_heatmap
from .routing_health import load_summary
from .version import __version__

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).parent / "model_cards" / "goat_adapter.md"
CARD_NAME = "README.md"
HEATMAP_NAME = "routing_heatmap.png"
BASE_TAGS = ("goat", "lora", "moe", "mixture-of-experts")
PIPELINES = {
    "ForCausalLM": "text-generation",
    "ForSequenceClassification": "text-classification",
    "ForImageClassification": "image-classification",
    "ForTokenClassification": "token-classification",
}
HYPERPARAMETERS = (
    "learning_rate",
    "router_learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    "seed",
)


def write_model_card(
    model: nn.Module,
    folder: str | os.PathLike,
    trainer: Any = None,
    *,
    dataset_name: str | list[str] | None = None,
    metrics: dict[str, float] | None = None,
    license: str | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
    model_name: str | None = None,
    eval_dataset_name: str | None = None,
) -> Path:
    """Write README.md for the adapter in `folder`; settings from the model, training facts from `trainer`.

    With the expert loads a GoatTrainer logged (`trainer.routing_loads`) the card shows them as a table and as
    routing_heatmap.png, written beside it (skipped, with a note, without Pillow). `base_model` is the Hub id
    of the base, needed when the model's own `config._name_or_path` is a local folder; without one the card
    says the base is local. `dataset_name` takes Hub dataset ids (listed as the card's `datasets`) or words
    describing local data (named in the results only); `metrics` add to the evaluation metrics the trainer
    logged, which become the Hub's `model-index`, on `eval_dataset_name` (default: the first of `dataset_name`).
    """
    loads = getattr(trainer, "routing_loads", None)
    missing = "no GoatTrainer logged them for this card (it records them at each logging step)"
    return _write_card(
        adapter_metadata(model),
        Path(folder),
        trainer,
        loads,
        missing,
        dataset_name=dataset_name,
        metrics=metrics,
        license=license,
        base_model=base_model,
        tags=tags,
        model_name=model_name,
        eval_dataset_name=eval_dataset_name,
    )


def write_model_card_for_folder(
    folder: str | os.PathLike,
    base_model: str | None = None,
    *,
    dataset_name: str | list[str] | None = None,
    metrics: dict[str, float] | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
) -> Path:
    """Write README.md for a saved adapter folder from its goat_config.json alone (no base model is loaded).

    The adapter files do not record routing loads, so this card says so and has no heatmap; a card written by
    GoatTrainer while saving has both.
    """
    folder = Path(folder)
    missing = f"this card was written from {CONFIG_NAME}, which does not record them"
    return _write_card(
        read_adapter_config(folder),
        folder,
        None,
        None,
        missing,
        dataset_name=dataset_name,
        metrics=metrics,
        license=license,
        base_model=base_model,
        tags=tags,
    )


def _write_card(
    meta: dict[str, Any],
    folder: Path,
    trainer: Any,
    loads: dict[str, list[float]] | None,
    missing_loads: str,
    *,
    dataset_name: str | list[str] | None,
    metrics: dict[str, float] | None,
    license: str | None,
    base_model: str | None,
    tags: list[str] | None,
    model_name: str | None = None,
    eval_dataset_name: str | None = None,
) -> Path:
    config = GoatConfig.from_dict(meta["config"])
    architecture = meta["base_model"]["architecture"]
    pipeline_tag = next((tag for suffix, tag in PIPELINES.items() if architecture.endswith(suffix)), None)
    base_model = base_model or hub_id(meta["base_model"].get("name_or_path"))
    metrics = {**_trainer_metrics(trainer), **(metrics or {})}
    dataset_names = _as_list(dataset_name or getattr(getattr(trainer, "args", None), "dataset_name", None))
    eval_dataset_name = eval_dataset_name or (dataset_names[0] if dataset_names else None)
    dataset_names += [eval_dataset_name] if eval_dataset_name and eval_dataset_name not in dataset_names else []
    hub_datasets = [name for name in dataset_names if hub_id(name)]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="goat_hf",
        license=license,
        tags=list(dict.fromkeys([*BASE_TAGS, *([pipeline_tag] if pipeline_tag else []), *(tags or [])])),
        datasets=hub_datasets or None,
        metrics=sorted({_metric_type(key) for key in _eval_metrics(metrics)}) or None,
        pipeline_tag=pipeline_tag,
        model_name=model_name or folder.resolve().name,
        eval_results=_eval_results(metrics, eval_dataset_name, pipeline_tag),
    )
    layers = meta["layers"].values()
    folder.mkdir(parents=True, exist_ok=True)
    heatmap, heatmap_note = _heatmap(loads, folder)
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=f"GOAT adapter for {base_model or architecture}",
        base_model=base_model,
        architecture=architecture,
        local_datasets=[name for name in dataset_names if name not in hub_datasets],
        num_experts=config.num_experts,
        top_k=config.top_k,
        r=config.r,
        expert_rank=config.expert_rank,
        init=config.init,
        scaling=config.scaling,
        eta=config.eta,
        rho=config.rho,
        init_cof=f"{config.init_cof:g}",
        aux_loss_coef=config.aux_loss_coef,
        scaling_rows=[
            {"in_features": n, "scaling": f"{s:.4g}"}
            for n, s in sorted({(layer["in_features"], layer["scaling"]) for layer in layers})
        ],
        target_modules=config.target_modules,
        num_layers=len(layers),
        modules_to_save=", ".join(meta["modules_to_save"]) or "none",
        hyperparameters=_hyperparameters(trainer),
        metrics={key: f"{value:.4f}" if isinstance(value, float) else value for key, value in metrics.items()},
        routing_rows=_routing_rows(loads),
        missing_loads=missing_loads,
        heatmap=heatmap,
        heatmap_note=heatmap_note,
        usage=_usage(architecture, base_model, recorded=hub_id(meta["base_model"]["name_or_path"]) is not None),
        versions=_versions(),
    )
    path = folder / CARD_NAME
    card.save(path)
    return path


def _as_list(names: str | list[str] | None) -> list[str]:
    return [names] if isinstance(names, str) else list(names or [])


def _heatmap(loads: dict[str, list[float]] | None, folder: Path) -> tuple[str | None, str | None]:
    """(file name, None) once the heatmap is drawn; (None, why) when it cannot be."""
    if not loads:
        return None, None
    try:
        draw_load_heatmap(loads, folder / HEATMAP_NAME)
    except ImportError:
        logger.info("%s; the model card in %s has the load table only.", PILLOW_MISSING, folder)
        return None, f"{PILLOW_MISSING}; this card has the table only"
    return HEATMAP_NAME, None


def _trainer_metrics(trainer: Any) -> dict[str, float]:
    history = getattr(getattr(trainer, "state", None), "log_history", None) or []
    metrics: dict[str, float] = {}
    for entry in history:
        metrics.update({k: v for k, v in entry.items() if k.startswith("eval_") or k == "train_loss"})
    return {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second"))}


def _eval_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The evaluation scores worth a model-index entry: eval_* numbers but the loss and the epoch."""
    skip = ("eval_loss", "eval_epoch", "eval_aux_loss", "eval_task_loss")
    return {
        key: value
        for key, value in metrics.items()
        if key.startswith("eval_") and key not in skip and isinstance(value, (int, float))
    }


def _metric_type(key: str) -> str:
    return key.removeprefix("eval_")


def _eval_results(metrics: dict[str, float], dataset: str | None, pipeline_tag: str | None) -> list | None:
    """The Hub's model-index: one result per metric, on `dataset` (a Hub id, or words naming local data)."""
    if not dataset:
        return None
    results = [
        EvalResult(
            task_type=pipeline_tag or "other",
            dataset_type=hub_id(dataset) or "local",
            dataset_name=dataset,
            metric_type=_metric_type(key),
            metric_value=value,
        )
        for key, value in _eval_metrics(metrics).items()
    ]
    return results or None


def _hyperparameters(trainer: Any) -> dict[str, Any]:
    args = getattr(trainer, "args", None)
    if args is None:
        return {}
    values = {key: getattr(args, key, None) for key in HYPERPARAMETERS}
    values.update(getattr(trainer, "card_settings", {}))  # e.g. a DPO run's beta, loss type and reference model
    return {key: getattr(value, "value", value) for key, value in values.items() if value is not None}  # enums by name


def _routing_rows(loads: dict[str, list[float]] | None) -> list[dict[str, str]]:
    import torch

    rows = []
    for name, shares in (loads or {}).items():
        summary = load_summary(torch.tensor([shares]))
        rows.append({"layer": name, **{key: f"{value:.3f}" for key, value in summary.items()}})
    return rows


def _usage(architecture: str, base_model: str | None, recorded: bool) -> str:
    """How to load and run the adapter; `recorded` says whether goat_config.json names the base by a Hub id."""
    base = base_model or "<base model id or folder>"
    if recorded:
        load = 'model = load_goat_model("<this repo id or folder>")  # loads the base recorded in goat_config.json'
    else:  # a local base: goat_config.json records no id (a path would not exist on another machine)
        load = f'model = load_goat_model("<this repo id or folder>", base_model="{base}")'
    if architecture.endswith("ForImageClassification"):
        imports = "from PIL import Image\nfrom transformers import AutoImageProcessor\n"
        run = (
            f'processor = AutoImageProcessor.from_pretrained("{base}")\n'
            'inputs = processor(Image.open("an_image.png").convert("RGB"), return_tensors="pt")\n'
            "print(model.config.id2label[model(**inputs).logits.argmax(-1).item()])"
        )
    elif architecture.endswith("ForCausalLM"):
        imports = "from transformers import AutoTokenizer\n"
        run = (
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
            'inputs = tokenizer("Question: what is 12 + 30?\\nAnswer:", return_tensors="pt")\n'
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))"
        )
    else:
        imports = "from transformers import AutoTokenizer\n"
        run = (
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
            'inputs = tokenizer("a sentence to classify", return_tensors="pt")\n'
            "print(model(**inputs).logits.argmax(-1))"
        )
    return f"{imports}from goat_hf import load_goat_model\n\n{load}\n{run}"


def _versions() -> dict[str, str]:
    versions = {"goat_hf": __version__}  # the code that ran, not whichever goat_hf pip last installed
    for package in ("transformers", "torch", "trl", "huggingface_hub"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
