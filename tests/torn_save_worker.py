"""Child process of test_torn_saves.py: saves adapter A, then kills a save of adapter B at every file operation.

usage: torn_save_worker.py OUT_DIR

Writes OUT_DIR/old (A) and OUT_DIR/new (B) as references, then for each k forks a process that starts from a copy
of A in OUT_DIR/kill-k, saves B there and SIGKILLs itself right before its k-th file operation on that folder (or
after writing half of a file's bytes). OUT_DIR/events.json lists, per k, the operation it died at and how the
forked process ended.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import perturb_, tiny_llama, train_like_  # noqa: E402

from goat_hf import GoatConfig, get_goat_model, goat_layers, save_goat_adapter  # noqa: E402

REAL = {name: getattr(os, name) for name in ("open", "write", "fsync", "replace", "close")}


class KillAt:
    """Counts every file operation on `folder` and SIGKILLs this process at the `kill_at`-th one (-1: never)."""

    def __init__(self, folder: Path, kill_at: int, events: list[str]) -> None:
        self.folder, self.kill_at, self.events = folder, kill_at, events
        self.fds: set[int] = set()
        self.halved: set[int] = set()

    def install(self) -> None:
        os.open, os.write, os.fsync, os.replace, os.close = self.open, self.write, self.fsync, self.replace, self.close

    def step(self, name: str) -> None:
        self.events.append(name)
        if len(self.events) - 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def open(self, path, flags, mode=0o777, *args, **kwargs):
        if not str(path).startswith(str(self.folder)):
            return REAL["open"](path, flags, mode, *args, **kwargs)
        self.step("open the folder" if Path(path) == self.folder else f"open {Path(path).name}")
        fd = REAL["open"](path, flags, mode, *args, **kwargs)
        self.fds.add(fd)
        return fd

    def write(self, fd, data):
        if fd not in self.fds:
            return REAL["write"](fd, data)
        self.step("write")
        if fd in self.halved:
            return REAL["write"](fd, data)
        self.halved.add(fd)  # the first write stops halfway, so that a kill can fall in the middle of the file
        written = REAL["write"](fd, bytes(data[: max(1, len(data) // 2)]))
        self.step("half written")
        return written

    def fsync(self, fd):
        if fd in self.fds:
            self.step("fsync")
        return REAL["fsync"](fd)

    def replace(self, source, target):
        self.step(f"rename to {Path(target).name}")
        return REAL["replace"](source, target)

    def close(self, fd):
        if fd in self.fds:
            self.step("close")
            self.fds.discard(fd)
            self.halved.discard(fd)  # the number is reused by the next open
        return REAL["close"](fd)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    model = train_like_(get_goat_model(tiny_llama(seed=0), GoatConfig(r=16, num_experts=8, top_k=2)))
    save_goat_adapter(model, out / "old")
    for layer in goat_layers(model).values():  # adapter B differs from A in every layer
        perturb_(layer.expert_B, seed=7)
    save_goat_adapter(model, out / "new")
    report = []
    k = 0
    while True:
        folder = out / f"kill-{k}"
        shutil.copytree(out / "old", folder)
        events: list[str] = []
        pid = os.fork()
        if pid == 0:
            KillAt(folder, k, events).install()
            save_goat_adapter(model, folder)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        report.append({"folder": folder.name, "killed": killed})
        if not killed:  # the save got past its last operation: every point has been tried
            break
        k += 1
    names: list[str] = []
    KillAt(out / "dry-run", -1, names).install()  # the operation each k died at, from one full save
    shutil.copytree(out / "old", out / "dry-run")
    save_goat_adapter(model, out / "dry-run")
    for entry, name in zip(report, names + ["(none: the save finished)"], strict=False):
        entry["died_at"] = name
    (out / "events.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
