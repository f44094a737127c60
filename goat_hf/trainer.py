"""GoatTrainerMixin and GoatTrainer: Trainer with GOAT injection, the balance loss, router optimizer groups and
adapter-only checkpoints (DESIGN §5). GoatSFTTrainer (TRL) lives in sft_trainer.py."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.trainer import is_optimizer_factory

from .adapter_io import restore_goat_weights, save_goat_adapter
from .checkpoints import checkpoint_problem, last_complete_checkpoint
from .config import GoatConfig
from .model import get_goat_model, goat_layers, parameter_kind, trainer_accepts_quantized_base
from .model_card import write_model_card
from .routing_health import load_summary
from .routing_trackers import RoutingTrackerCallback
from .step_guard import NonFiniteGuard
from .trainer_hub import GoatHubMixin
from .trainer_sharding import GoatShardedCheckpointMixin
from .training_args import GoatTrainingArguments

logger = logging.getLogger(__name__)

TRAINING_ARGS_NAME = "training_args.bin"
# transformers 5.24 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs) and warns on the old
# names; 5.0-5.23 know only the old ones. (Both attributes mirror each other once the arguments are built.)
CHECKPOINTING_FLAG = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


class GoatTrainerMixin(GoatHubMixin, GoatShardedCheckpointMixin):
    """Mix into a transformers Trainer (before it in the bases) to train GOAT adapters.

    - injects GOAT with `goat_config`, the GOAT flags of GoatTrainingArguments, or the paper's defaults when the
      model has no GOAT layers yet;
    - adds aux_loss_coef * (sum of the layers' balance losses) to the training loss, scaled for gradient
      accumulation exactly like the task loss;
    - logs aux_loss, task_loss and routing health (collected in compute_loss, merged in log, as TRL does);
    - builds optimizer groups for experts, routers (own lr, no decay) and the task head;
    - saves and restores the adapter only (plus Trainer's optimizer, scheduler and RNG state).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: Any = None,
        *rest: Any,
        goat_config: GoatConfig | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError(f"{type(self).__name__} needs `model` (model_init is not supported).")
        self._inject_goat(model, args, goat_config)
        with trainer_accepts_quantized_base(model):
            super().__init__(model, args, *rest, **kwargs)
        self._goat_layers = list(goat_layers(self.model).values())
        self._goat_metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._warned_no_aux_gradient = False
        self.routing_loads: dict[str, list[float]] = {}  # last logged per-layer expert load shares
        self.routing_aux: dict[str, float] = {}  # last logged per-layer balance loss / k (1.0 = balanced)
        self.add_callback(RoutingTrackerCallback(self))  # routing heatmap and per-layer loads in the trackers
        self.nonfinite_guard = NonFiniteGuard(self, getattr(self.args, "on_nonfinite", "stop"))
        self.add_callback(self.nonfinite_guard)

    # ---- set-up ----

    def _inject_goat(self, model: nn.Module, args: Any, goat_config: GoatConfig | None) -> None:
        """Resolve the GoatConfig and inject GOAT layers unless the model has them (a second call changes nothing)."""
        config = self._resolve_goat_config(model, args, goat_config)
        self.aux_loss_coef = config.aux_loss_coef
        self._check_activation_checkpointing(args)  # before injecting: a refused trainer leaves the model as it was
        if getattr(model, "goat_state", None) is None:
            get_goat_model(model, config)
            logger.info("Injected GOAT layers: %s", config)

    @staticmethod
    def _resolve_goat_config(model: nn.Module, args: Any, goat_config: GoatConfig | None) -> GoatConfig:
        """`goat_config`, else the GOAT flags of GoatTrainingArguments, else the defaults; a model that already
        has GOAT layers keeps its own config."""
        from_args = args.to_goat_config() if isinstance(args, GoatTrainingArguments) else None
        state = getattr(model, "goat_state", None)
        if state is None:
            return goat_config or from_args or GoatConfig()
        if goat_config is not None and goat_config != state.config:
            raise ValueError(
                "The model already has GOAT layers with another GoatConfig; pass goat_config only for a model "
                "without GOAT layers, or unload_goat(model) first."
            )
        if goat_config is None and from_args is not None and from_args != state.config:
            logger.warning(
                "The model already has GOAT layers: training with their GoatConfig (aux_loss_coef=%g); the GOAT "
                "flags of GoatTrainingArguments are not used.",
                state.config.aux_loss_coef,
            )
        return state.config

    def _check_activation_checkpointing(self, args: Any) -> None:
        kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or {}
        if getattr(args, "gradient_checkpointing", False) and kwargs.get("use_reentrant") and self.aux_loss_coef:
            raise ValueError(
                "Reentrant activation checkpointing runs the forward under no_grad, so the balance loss would never "
                f"reach the routers. Use {CHECKPOINTING_FLAG}_kwargs={{'use_reentrant': False}} (the default), or "
                "aux_loss_coef=0 to train without the balance loss."
            )

    # ---- loss ----

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.nonfinite_guard.record_loss(loss)  # checked with the gradients before the optimizer step
        return loss

    def _loss_uses_num_items_in_batch(self, model: nn.Module) -> bool:
        """Whether the task loss really divides by `num_items_in_batch` (then it is already scaled for GA).

        Trainer assumes so for every model whose forward takes **kwargs, but only the causal-LM loss does it:
        BERT/RoBERTa classification heads return a batch mean (transformers issue 47688).
        """
        if self.compute_loss_func is not None:
            return True
        unwrapped = self.accelerator.unwrap_model(model)
        return self.model_accepts_loss_kwargs and LOSS_MAPPING.get(getattr(unwrapped, "loss_type", None)) is (
            ForCausalLMLoss
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        for layer in self._goat_layers:
            layer.routing = None  # a layer this forward skips must not hand in last step's graph
        declared = getattr(
            type(self), "loss_is_scaled_for_ga", None
        )  # TRL's trainers declare it: DPO's loss is not, GRPO's is
        if declared is None:
            scaled = num_items_in_batch is not None and self._loss_uses_num_items_in_batch(model)
        else:
            scaled = declared
        self.loss_is_scaled_for_ga = scaled  # read by Trainer.training_step
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch if scaled else None
        )
        if not model.training:
            return result  # no balance loss in evaluation
        loss, outputs = result if return_outputs else (result, None)
        records = [layer.routing for layer in self._goat_layers if layer.routing is not None]
        balance = torch.stack([record.balance_loss for record in records]) if records else None  # [layers]
        aux = balance.sum() if records else loss.new_zeros(())
        steps = self.current_gradient_accumulation_steps if scaled else 1  # Trainer divides the rest itself
        self._collect_metrics(loss.detach() * steps, aux.detach(), records, balance)
        if self.aux_loss_coef:
            self._check_aux_gradient(aux)
            loss = loss + self.aux_loss_coef * aux / steps
        return (loss, outputs) if return_outputs else loss

    def _check_aux_gradient(self, aux: torch.Tensor) -> None:
        if aux.requires_grad or self._warned_no_aux_gradient or not torch.is_grad_enabled():
            return
        self._warned_no_aux_gradient = True
        logger.warning(
            "The GOAT balance loss has no gradient path to the routers: the model's forward ran without autograd "
            "(reentrant activation checkpointing?). Enable checkpointing with use_reentrant=False."
        )

    # ---- metrics (collected per step, merged into the logs) ----

    def _collect_metrics(
        self, task_loss: torch.Tensor, aux: torch.Tensor, records: list, balance: torch.Tensor | None
    ) -> None:
        """Per step: the task loss, the balance loss per layer over k (1.0 = balanced) and the expert loads."""
        self._goat_metrics["task_loss"].append(task_loss.float())
        top_k = self._goat_layers[0].top_k if self._goat_layers else 1
        self._goat_metrics["aux_loss"].append(aux.float() / (top_k * max(len(records), 1)))  # mean over layers
        if records and len(records) == len(self._goat_layers):
            self._goat_metrics["layer_aux"].append(balance.detach() / top_k)
            self._goat_metrics["loads"].append(torch.stack([record.expert_load for record in records]))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Merge the GOAT metrics of the steps since the last log into a training log line (TRL's way).

        `aux_loss` is each layer's balance loss E·Σ f·P divided by k, averaged over the layers: 1.0 is balanced
        routing, whatever the number of layers. The loss term is aux_loss_coef · Σ_layers E·Σ f·P, that is
        aux_loss_coef · k · (number of layers) · aux_loss. Per-layer values go to the trackers (routing_trackers).
        """
        if "loss" in logs and self._goat_metrics:
            metrics = {key: torch.stack(values).mean(0) for key, values in self._goat_metrics.items()}
            metrics = {key: self.accelerator.reduce(value, reduction="mean") for key, value in metrics.items()}
            logs["task_loss"] = round(metrics["task_loss"].item(), 4)
            logs["aux_loss"] = round(metrics["aux_loss"].item(), 4)
            if "loads" in metrics:
                names = list(goat_layers(self.accelerator.unwrap_model(self.model)))
                self.routing_loads = dict(zip(names, metrics["loads"].tolist(), strict=True))
                self.routing_aux = dict(zip(names, metrics["layer_aux"].tolist(), strict=True))
                logs.update({f"router_{k}": round(v, 4) for k, v in load_summary(metrics["loads"]).items()})
            self._goat_metrics.clear()
        super().log(logs, start_time)

    # ---- optimizer ----

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
                self.args, opt_model
            )
            if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(optimizer_kwargs):
                logger.warning("%s builds its own parameter groups; the GOAT groups are not used.", optimizer_cls)
                return super().create_optimizer(model)
            self.optimizer = optimizer_cls(self.goat_parameter_groups(opt_model), **optimizer_kwargs)
        return self.optimizer

    def goat_parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Trainable parameters only: experts, routers (own lr and decay), task head (own lr) with and without decay."""
        decay = set(self.get_decay_parameter_names(model))
        args = self.args
        head_lr = getattr(args, "head_learning_rate", None) or args.learning_rate
        settings = {
            "experts": (args.learning_rate, args.weight_decay),
            "router": (
                getattr(args, "router_learning_rate", None) or args.learning_rate,
                getattr(args, "router_weight_decay", 0.0),
            ),
            "head": (head_lr, args.weight_decay),
            "head_no_decay": (head_lr, 0.0),
        }
        params: dict[str, list[nn.Parameter]] = {name: [] for name in settings}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            kind = parameter_kind(name)
            if kind == "head" and name not in decay:
                kind = "head_no_decay"
            params[kind].append(param)
        groups = [
            {"name": name, "params": params[name], "lr": lr, "weight_decay": wd}
            for name, (lr, wd) in settings.items()
            if params[name]
        ]
        described = (
            f"{g['name']}: {sum(p.numel() for p in g['params']):,} params, lr {g['lr']:g}, decay {g['weight_decay']:g}"
            for g in groups
        )
        logger.info("GOAT optimizer groups: %s", ", ".join(described))
        return groups

    # ---- saving and loading: the adapter only ----

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        # every rank: under FSDP2 / ZeRO-3 the adapter is gathered collectively, then the main process writes it
        save_goat_adapter(model, output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        try:  # the card only decorates the checkpoint: it must never end a run
            write_model_card(model, output_dir, trainer=self)
        except Exception as error:  # noqa: BLE001 - any failure of a decoration is logged, not raised
            logger.warning(
                "No model card in %s (%s: %s); the adapter and the rest are saved.",
                output_dir,
                type(error).__name__,
                error,
            )
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train; `resume_from_checkpoint=True` resumes from the last *complete* checkpoint."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        problem = checkpoint_problem(resume_from_checkpoint)
        if problem is not None:
            raise ValueError(
                f"Cannot resume from {resume_from_checkpoint}: {problem}. Name a complete checkpoint, or pass "
                "resume_from_checkpoint=True to take the last complete one."
            )
        restore_goat_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info(
            "Loading the best adapter from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric
        )
        restore_goat_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


class GoatTrainer(GoatTrainerMixin, Trainer):
    """`transformers.Trainer` that trains GOAT adapters: change the class name in an existing script."""
