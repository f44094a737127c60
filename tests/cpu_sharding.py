"""Test-only: let accelerate run FSDP (and DeepSpeed) on CPU processes, as it does on GPUs.

accelerate 1.15 turns an FSDP plugin into `DistributedType.FSDP` only for GPU-like distributed types
(AcceleratorState.__init__, state.py: `elif self.distributed_type in [MULTI_GPU, MULTI_NPU, ...]`); a CPU
process group stays `MULTI_CPU` and the plugin is dropped, so a CPU "FSDP" run is plain DDP. DeepSpeed is
likewise switched on only `and not cpu`. `shard_on_cpu()` wraps AcceleratorState.__init__ and, for a MULTI_CPU
state that was handed a plugin, makes exactly the assignments that GPU branch makes. Everything after that (the
Trainer, `Accelerator.prepare` -> `fsdp2_prepare_model` -> `fully_shard`, or `deepspeed.initialize`, saving
and loading) is the code path users get on GPUs; `fully_shard` runs on the gloo backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def shard_on_cpu() -> None:
    original_init = AcceleratorState.__init__
    if getattr(original_init, "shards_on_cpu", False):
        return

    def init(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs) -> None:
        original_init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":  # bf16 / fp16: FSDP2's MixedPrecisionPolicy, as on GPUs
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
        elif deepspeed_plugin is not None:
            self.distributed_type = DistributedType.DEEPSPEED
            self._mixed_precision = "no"  # DeepSpeed's config handles precision (state.py does the same)
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type

    init.shards_on_cpu = True
    AcceleratorState.__init__ = init


def run_ranks(worker: Path, out_dir: Path, *worker_args: str, timeout: int = 600, world_size: int = 2) -> None:
    """Run `worker` as `world_size` CPU processes (gloo), offline, one thread each, as torchrun would set them up;
    fail with their output.

    The ranks are started here, not by torchrun, so that they share one process group of their own: when a rank
    fails the others would wait in a gloo collective until its timeout (30 min), and torchrun starts each rank in a
    session of its own, so killing torchrun on a timeout left them running. Here the group is killed as soon as one
    rank fails, on the timeout, and whenever this function exits. Each rank's output goes to out_dir/rank{r}.log;
    PYTHONFAULTHANDLER=1 puts the Python stack of a crash there.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(worker.parent.parent),
        "PYTHONFAULTHANDLER": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    }
    logs = [out_dir / f"rank{rank}.log" for rank in range(world_size)]
    ranks: list[subprocess.Popen] = []
    try:
        for rank, log in enumerate(logs):
            rank_env = env | {"RANK": str(rank), "LOCAL_RANK": str(rank)}
            leader = ranks[0].pid if ranks else 0  # rank 0 leads a new process group, the others join it
            with log.open("w") as output:
                command = [sys.executable, str(worker), str(out_dir), *worker_args]
                ranks.append(
                    subprocess.Popen(
                        command,
                        env=rank_env,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        preexec_fn=partial(join_group_and_die_with_parent, leader),
                    )
                )
        codes = wait_for_ranks(ranks, timeout)
    finally:
        kill_group(ranks[0].pid if ranks else None)
        for process in ranks:
            process.wait()  # reaped, so no zombie outlives the test
    tails = "".join(
        f"\n--- rank {rank} (exit {code}) ---\n{log.read_text()[-4000:]}"
        for rank, (code, log) in enumerate(zip(codes, logs, strict=True))
    )
    assert codes == [0] * world_size, tails


def join_group_and_die_with_parent(leader: int) -> None:
    """In the rank, before exec: join rank 0's process group (0: lead a new one), and get SIGKILL when the test
    process dies (Linux PR_SET_PDEATHSIG), so that even a killed pytest, which runs no `finally`, leaves no rank."""
    os.setpgid(0, leader)
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def wait_for_ranks(ranks: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit codes once every rank has exited, or as soon as one failed or the time ran out (None: still running)."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [rank.poll() for rank in ranks]
        if all(code == 0 for code in codes) or any(code not in (None, 0) for code in codes):
            return codes
        if time.monotonic() > deadline:
            return codes
        time.sleep(0.2)


def kill_group(pgid: int | None) -> None:
    if pgid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
