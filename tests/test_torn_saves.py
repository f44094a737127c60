"""kill -9 at each file operation of a save: the folder loads the old adapter, the new one, or says it is incomplete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, token_batch

from goat_hf import GoatAdapterError, load_goat_adapter, save_goat_adapter

WORKER = Path(__file__).parent / "torn_save_worker.py"


def logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_goat_adapter(tiny_llama(seed=0), folder)(**token_batch()).logits


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("torn")
    subprocess.run([sys.executable, str(WORKER), str(out)], check=True, timeout=600)
    return out, json.loads((out / "events.json").read_text())


def test_every_kill_point_leaves_old_new_or_incomplete(killed_saves):
    out, report = killed_saves
    old, new = logits(out / "old"), logits(out / "new")
    assert not torch.allclose(old, new)
    killed = [entry for entry in report if entry["killed"]]
    assert len(killed) == 20  # two files, each: open, write, half written, write, fsync, close, rename, folder
    outcomes = {}
    for entry in report:
        folder = out / entry["folder"]
        try:
            found = logits(folder)
        except GoatAdapterError as error:
            assert "is incomplete" in str(error), (entry, str(error))
            outcomes[entry["folder"]] = "incomplete"
            continue
        if torch.equal(found, old):
            outcomes[entry["folder"]] = "old"
        else:
            assert torch.equal(found, new), entry  # never a mix of the two adapters
            outcomes[entry["folder"]] = "new"
    by_point = {entry["died_at"]: outcomes[entry["folder"]] for entry in report}
    assert by_point["rename to goat_adapter.safetensors"] == "old"  # killed before the first rename
    assert outcomes[report[-1]["folder"]] == "new" and not report[-1]["killed"]
    assert set(outcomes.values()) == {"old", "new", "incomplete"}
    first_rename = [e["died_at"] for e in report].index("rename to goat_adapter.safetensors")
    second_rename = [e["died_at"] for e in report].index("rename to goat_config.json")
    for entry in report[first_rename + 1 : second_rename + 1]:  # new weights beside the old config
        assert outcomes[entry["folder"]] == "incomplete", entry


def test_the_next_save_cleans_up_and_completes(killed_saves):
    out, report = killed_saves
    new = logits(out / "new")
    with_orphans = [e for e in report if any(p.name.endswith(".tmp") for p in (out / e["folder"]).iterdir())]
    assert with_orphans  # a save killed mid-write leaves its temporary file behind
    for entry in report:
        folder = out / entry["folder"]
        model = load_goat_adapter(tiny_llama(seed=0), out / "new")
        save_goat_adapter(model, folder)
        assert not any(p.name.endswith(".tmp") for p in folder.iterdir()), entry
        assert torch.equal(logits(folder), new)
