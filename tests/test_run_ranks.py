"""cpu_sharding.run_ranks, the launcher of the multi-process tests: a failed or hung rank must not leave the
others running (a rank blocked in a gloo collective waits 30 minutes; orphaned ones were seen under torchrun)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cpu_sharding import run_ranks

WORKER = """
import os, sys, time
from pathlib import Path
out, mode = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
(out / f"pid{rank}").write_text(str(os.getpid()))
if mode == "rank1-fails" and rank == 1:
    while not (out / "pid0").exists():  # rank 0 is up and about to wait
        time.sleep(0.05)
    sys.exit("rank 1 gave up")
if mode == "ok":
    print(f"rank {rank} of {os.environ['WORLD_SIZE']} at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
    sys.exit(0)
time.sleep(600)  # a rank waiting for a collective that never comes
"""


@pytest.fixture
def worker(tmp_path: Path) -> Path:
    path = tmp_path / "worker" / "rank_worker.py"
    path.parent.mkdir()
    path.write_text(WORKER)
    return path


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_every_rank_runs_with_the_distributed_environment(worker, tmp_path):
    run_ranks(worker, tmp_path / "out", "ok")
    logs = [(tmp_path / "out" / f"rank{rank}.log").read_text() for rank in (0, 1)]
    assert logs[0].startswith("rank 0 of 2 at 127.0.0.1:") and logs[1].startswith("rank 1 of 2 at 127.0.0.1:")


def test_a_failed_rank_stops_the_others_at_once(worker, tmp_path):
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)rank 0 \(exit None\).*rank 1 \(exit 1\) ---\nrank 1 gave up"):
        run_ranks(worker, tmp_path / "out", "rank1-fails", timeout=120)
    assert time.monotonic() - start < 60
    assert gone(int((tmp_path / "out" / "pid0").read_text()))


def test_hung_ranks_are_killed_on_the_timeout(worker, tmp_path):
    with pytest.raises(AssertionError, match=r"rank 0 \(exit None\)"):
        run_ranks(worker, tmp_path / "out", "hang", timeout=4)
    for rank in (0, 1):
        assert gone(int((tmp_path / "out" / f"pid{rank}").read_text()))


def test_ranks_die_with_the_test_process(worker, tmp_path):
    """A test process killed outright (SIGKILL: no `finally` runs) takes its ranks with it."""
    script = tmp_path / "launcher.py"
    out = tmp_path / "out"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"from pathlib import Path\nfrom cpu_sharding import run_ranks\n"
        f"run_ranks(Path({str(worker)!r}), Path({str(out)!r}), 'hang', timeout=600)\n"
    )
    launcher = subprocess.Popen([sys.executable, str(script)])
    pids = [out / f"pid{rank}" for rank in (0, 1)]
    deadline = time.monotonic() + 60
    while not all(path.exists() and path.read_text() for path in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    launcher.kill()
    launcher.wait()
    ranks = [int(path.read_text()) for path in pids]
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in ranks if not gone(pid)]
    for pid in left:  # this test's own orphans, if the launcher failed to take them along
        os.kill(pid, signal.SIGKILL)
    assert not left
