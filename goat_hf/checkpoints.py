"""Which checkpoint `resume_from_checkpoint=True` resumes from: the last complete one, never a torn one.

Trainer writes a checkpoint's adapter, then optimizer, scheduler and RNG state, and trainer_state.json last;
a run killed in between leaves a folder Trainer's own `get_last_checkpoint` would pick and then fail on.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_io import GoatAdapterError, check_adapter_folder

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete GOAT checkpoint, or None when it is."""
    folder = Path(folder)
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text())
    except FileNotFoundError:
        return f"{TRAINER_STATE_NAME} is missing (the save was interrupted)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{TRAINER_STATE_NAME} is unreadable ({error})"
    try:
        check_adapter_folder(folder)
    except GoatAdapterError as error:
        return str(error)
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str:
    """The newest complete checkpoint-N in `output_dir`; incomplete newer ones are skipped with a warning."""
    paths = list(Path(output_dir).iterdir()) if Path(output_dir).is_dir() else []
    steps = {path: CHECKPOINT_PATTERN.match(path.name) for path in paths if path.is_dir()}
    found = sorted((int(match.group(1)), path) for path, match in steps.items() if match)
    skipped = []
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        skipped.append(path.name)
        logger.warning("Not resuming from %s, which is incomplete: %s", path, problem)
    raise ValueError(
        f"No complete checkpoint to resume from in {output_dir}"
        + (f" (incomplete: {', '.join(skipped)})" if skipped else "")
        + "; train from the start (resume_from_checkpoint=None) or name a checkpoint folder."
    )
