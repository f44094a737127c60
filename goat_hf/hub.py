"""GOAT adapters on the Hub: push an adapter with its model card, resolve a Hub id or folder, load it with its base.

Every Hub call goes through an HfApi made at call time, so it uses the endpoint huggingface_hub has then (tests
point it at a local server). Tokens come from the `token` argument, else HF_TOKEN, else `hf auth login`; they
are handed to huggingface_hub only, never written to a file or a log line.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import CommitInfo, HfApi, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from torch import nn

from . import adapter_io
from .adapter_io import CONFIG_NAME, WEIGHTS_NAME, GoatAdapterError, read_adapter_config, save_goat_adapter
from .model_card import CARD_NAME, HEATMAP_NAME, write_model_card, write_model_card_for_folder
from .version import __version__

logger = logging.getLogger(__name__)

ADAPTER_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, HEATMAP_NAME]
# huggingface_hub raises its HTTP client's own errors (httpx / httpx2) for dropped or refused connections;
# they share HfHubHTTPError's first base class.
HubRequestError = HfHubHTTPError.__bases__[0]


class GoatHubError(OSError):
    """A Hub request that failed (token rejected, no such repo or revision, Hub unreachable); says what to do."""


def push_goat_adapter(
    model_or_folder: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload GOAT adapter",
    token: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Push a GOAT adapter, its model card and routing heatmap to `repo_id` in one commit.

    A model is saved with a fresh card into a temporary folder first. A saved folder is pushed as it is; when it
    has no README.md, a card is written into it from goat_config.json (an existing card is never replaced). Only
    the adapter files are uploaded, never base weights. The repo is created when missing (`private` applies
    then); `revision` names a branch, created from the default branch when missing; `create_pr` opens a pull
    request against the default branch instead of committing to it.
    """
    push = functools.partial(
        upload_adapter_folder,
        repo_id=repo_id,
        private=private,
        revision=revision,
        commit_message=commit_message,
        token=token,
        create_pr=create_pr,
    )
    if isinstance(model_or_folder, nn.Module):
        with tempfile.TemporaryDirectory(prefix="goat-push-") as staging:
            save_goat_adapter(model_or_folder, staging)
            write_model_card(model_or_folder, staging)
            return push(staging)
    folder = Path(model_or_folder)
    read_adapter_config(folder)  # fails before any request when this is no adapter folder
    if not (folder / WEIGHTS_NAME).is_file():
        raise GoatAdapterError(f"{folder / WEIGHTS_NAME} is missing; save the adapter again before pushing it.")
    if not (folder / CARD_NAME).is_file():
        write_model_card_for_folder(folder)
        logger.info("%s had no model card: wrote %s from %s.", folder, CARD_NAME, CONFIG_NAME)
    return push(folder)


def create_adapter_repo(repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
    """Create `repo_id` on the Hub when it does not exist; returns the full id (with the namespace)."""
    try:
        return _api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    except (HfHubHTTPError, HubRequestError) as error:
        raise hub_error(error, f"Creating the Hub repo {repo_id!r}") from error


def upload_adapter_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    allow_patterns: list[str] | None = ADAPTER_FILES,
    path_in_repo: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str,
    token: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Create the repo (and branch) when missing, then upload `allow_patterns` of `folder` in one commit."""
    repo_id = create_adapter_repo(repo_id, private=private, token=token)
    api = _api()
    try:
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            allow_patterns=allow_patterns,
            commit_message=commit_message,
            revision=revision,
            token=token,
            create_pr=create_pr,
        )
    except (HfHubHTTPError, HubRequestError) as error:
        raise hub_error(
            error, f"Pushing to {repo_id!r}", "The adapter files here are unchanged; run the push again to retry."
        ) from error


def resolve_adapter_folder(adapter: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    """A local adapter folder as is, or a Hub repo id downloaded (or found in the cache when offline)."""
    path = Path(adapter)
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(str(adapter), revision=revision, token=token, allow_patterns=ADAPTER_FILES))
    except HFValidationError:
        raise GoatAdapterError(
            f"{adapter} is not a GOAT adapter folder: {CONFIG_NAME} is missing, as there is no such folder (nor is "
            "it a Hub repo id, namespace/name)."
        ) from None
    except LocalEntryNotFoundError as error:
        raise GoatHubError(
            f"{str(adapter)!r} is no local folder, nor in the local Hub cache, and the Hub cannot be reached (offline "
            "mode or no connection). Download it once while online, or pass a local adapter folder."
        ) from error
    except (HfHubHTTPError, HubRequestError) as error:
        action = f"{str(adapter)!r} is no local folder; downloading it from the Hub at revision {revision or 'main'!r}"
        raise hub_error(error, action) from error


def load_goat_adapter(
    model: nn.Module, adapter: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> nn.Module:
    """Inject the saved GOAT layers into a fresh base `model`, in place, exactly as they were saved.

    `adapter` is a local folder or a Hub repo id (downloaded at `revision`, or found in the cache when offline).
    """
    return adapter_io.load_goat_adapter(model, resolve_adapter_folder(adapter, revision=revision, token=token))


def load_goat_model(
    adapter: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load the base model the adapter was trained on (or `base_model`) and put the adapter on it.

    `adapter` is a local folder or a Hub repo id (at `revision`; from the cache alone with HF_HUB_OFFLINE=1).
    The base is built with the transformers class recorded in goat_config.json, from the recorded Hub id and
    revision unless `base_model` names another copy (a local folder, say); an adapter trained on a local base
    records no id, so it needs `base_model`.
    """
    folder = resolve_adapter_folder(adapter, revision=revision, token=token)
    recorded = read_adapter_config(folder)["base_model"]
    base = base_model or recorded.get("name_or_path")
    if base is None:
        raise GoatAdapterError(
            f"The adapter in {folder} was trained on a local {recorded['architecture']} and records no Hub id for "
            "its base; pass base_model='<Hub id or folder>' (its weights are checked against the adapter's record)."
        )
    if base_model is None and os.path.isabs(base) and not os.path.isdir(base):  # as earlier goat_hf versions wrote
        raise GoatAdapterError(
            f"The adapter in {folder} records the local folder {base}, which is not here; "
            "pass base_model='<Hub id or folder>'."
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
    return adapter_io.load_goat_adapter(model, folder)


def hub_error(error: Exception, action: str, after: str = "") -> GoatHubError:
    """A GoatHubError saying what failed and what to do; the token never appears in it."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, RevisionNotFoundError):
        why = "the repo has no such revision: check the branch, tag or commit id"
    elif isinstance(error, RepositoryNotFoundError):
        why = "the Hub has no such repo, or it is private and the token cannot read it: check the id and the token"
    elif status in (401, 403):
        why = (
            f"the Hub rejected the token (HTTP {status}): pass a token with write access as token=..., in the "
            "HF_TOKEN environment variable, or with `hf auth login`"
        )
    elif isinstance(error, HfHubHTTPError):
        why = f"the Hub answered HTTP {status}"
    else:
        why = "the Hub could not be reached or dropped the connection; check the connection and try again"
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return GoatHubError(f"{action} failed: {why}. ({type(error).__name__}: {detail}) {after}".strip())


def _api() -> HfApi:
    return HfApi(library_name="goat_hf", library_version=__version__)
