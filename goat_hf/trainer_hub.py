"""GoatHubMixin: Trainer's Hub pushes for GOAT adapters (push_to_hub, hub_strategy checkpoint pushes).

Trainer's own pushes upload whatever lies in output_dir and replace README.md with a card for a full model;
these overrides push the adapter, its GOAT card and routing heatmap (plus, for the "checkpoint" and
"all_checkpoints" strategies, the checkpoint folder Trainer resumes from), never base weights.
"""

from __future__ import annotations

import copy
import functools
import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo
from torch import nn
from transformers.trainer_utils import HubStrategy, SaveStrategy
from transformers.utils.hub import PushInProgress

from .hub import ADAPTER_FILES, create_adapter_repo, upload_adapter_folder
from .model_card import write_model_card

logger = logging.getLogger(__name__)


class GoatHubMixin:
    """Mix into a transformers Trainer (before it in the bases) so that its Hub pushes carry GOAT adapters.

    `args.hub_token` is taken out of the trainer's copy of the arguments: Trainer pickles them into
    training_args.bin, which would otherwise hold the token on disk and in pushed checkpoints.
    """

    def __init__(self, model: nn.Module | None = None, args: Any = None, *rest: Any, **kwargs: Any) -> None:
        self._hub_token = getattr(args, "hub_token", None)
        if self._hub_token is not None:
            args = copy.copy(args)
            args.hub_token = None
        self._push_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="goat-push")  # pushes in order
        if rest:
            super().__init__(model, args, *rest, **kwargs)
        else:  # by name: TRL's DPOTrainer and GRPOTrainer take `ref_model` / `reward_funcs` second, not `args`
            super().__init__(model, args=args, **kwargs)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        if not self.is_world_process_zero():
            return
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        private = private if private is not None else self.args.hub_private_repo
        self.hub_model_id = create_adapter_repo(repo_id, private=private, token=token or self._hub_token)
        self.push_in_progress = None

    def create_model_card(
        self,
        *,
        license: str | None = None,
        tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_name: str | list[str] | None = None,
        finetuned_from: str | None = None,
        model_name: str | None = None,
        **unused: Any,
    ) -> None:
        """Write the GOAT card into output_dir (Trainer's and TRL's cards describe a full model and would replace
        it). `finetuned_from` is the base model's Hub id; `dataset`/`dataset_name` go into the card's metadata."""
        if not self.is_world_process_zero():
            return
        ignored = sorted(key for key, value in unused.items() if value is not None)
        if ignored:
            logger.info("The GOAT model card does not use %s.", ", ".join(ignored))
        write_model_card(
            self.accelerator.unwrap_model(self.model),
            self.args.output_dir,
            trainer=self,
            license=license,
            dataset_name=dataset_name or dataset,
            base_model=finetuned_from,
            tags=[tags] if isinstance(tags, str) else tags,
            model_name=model_name,
        )

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **card_kwargs: Any,
    ) -> CommitInfo | Future | None:
        """Save the adapter and its GOAT card into output_dir, then push adapter, card and heatmap in one commit.

        `card_kwargs` (license, dataset, finetuned_from, tags, ...) go to `create_model_card`. Returns the
        CommitInfo, or a Future when `blocking=False`.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self._hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        if card_kwargs:
            self.create_model_card(**card_kwargs)
        self._finish_current_push()
        push = functools.partial(
            upload_adapter_folder,
            self.args.output_dir,
            self.hub_model_id,
            revision=revision or self.args.hub_revision,
            commit_message=commit_message or "End of training",
            token=token,
        )
        return push() if blocking else self._push_executor.submit(push)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push the adapter of a new checkpoint (and, by hub_strategy, the checkpoint itself) in the background."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        for name in ADAPTER_FILES:  # the top of output_dir (and of the repo) mirrors the latest adapter
            source, target = Path(checkpoint_folder) / name, Path(self.args.output_dir) / name
            if source.is_file():
                shutil.copy(source, target)
            else:
                target.unlink(missing_ok=True)  # a heatmap from before would not match this card
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch)}"
        push = functools.partial(
            upload_adapter_folder, repo_id=self.hub_model_id, revision=self.args.hub_revision, token=self._hub_token
        )
        jobs = [self._submit_push(push, self.args.output_dir, commit_message=message)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            # The whole checkpoint (adapter, optimizer, scheduler, RNG and trainer state) so training can resume.
            last = self.args.hub_strategy == HubStrategy.CHECKPOINT
            path_in_repo = "last-checkpoint" if last else Path(checkpoint_folder).name
            jobs.append(
                self._submit_push(
                    push,
                    checkpoint_folder,
                    allow_patterns=None,
                    path_in_repo=path_in_repo,
                    commit_message=f"{message}, checkpoint",
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def _submit_push(self, push: functools.partial, folder: str, **kwargs: Any) -> Future:
        job = self._push_executor.submit(push, folder, **kwargs)
        job.add_done_callback(_log_failed_push)
        return job


def _log_failed_push(job: Future) -> None:
    if not job.cancelled() and job.exception() is not None:
        logger.warning(
            "A checkpoint push failed; training goes on and the next push uploads again: %s", job.exception()
        )
