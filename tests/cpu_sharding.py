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

import os
import subprocess
import sys
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


def torchrun(worker: Path, out_dir: Path, *worker_args: str, timeout: int = 900) -> None:
    """Run `worker` on 2 CPU processes (gloo) with torchrun, offline, one thread each; fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(worker.parent.parent)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
        str(out_dir),
        *worker_args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
