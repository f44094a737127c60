"""The CPU decode kernel: a GOAT layer's eager inference forward as one call from Python.

Why: a decoded token runs ~200 adapted layers, and on the CPU each ATen op called from Python costs 2-7 µs of dispatch
(more right after W0's matmul has streamed megabytes through the caches). The ATen path (decode.fused_base_forward)
is ten such ops per layer where a merged Linear is one, which made a SmolLM2-135M token 1.3-1.5x a merged LoRA's.
csrc/decode_cpu.cpp makes the matmul calls from C++ and does the top-k gating in a loop, so a layer is one call
from Python (a prepared layer measured 1.15x a merged Linear at batch 1 and 1.08x at batch 8, on ATen ops 1.47x and
1.27x: benchmarks/bench_decode_layers.py).

A GOAT layer with a plain fp32 nn.Linear base on the CPU takes it by itself in eval mode under no_grad, and so does
a prepared one (prepare_for_inference). It is compiled on first use by torch.utils.cpp_extension (a C++ compiler and
ninja; ~20 s on 2 cores) and cached in torch's extensions folder (TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions): later processes load it in a tenth of a second, and a build killed midway leaves nothing
that blocks the next (`_builder_lock`). Where it cannot be built, or with
GOAT_HF_CPU_KERNEL=0, the layers keep the ATen path (the same maths, equal up to fp32 rounding; slower), and say
why once.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_cpu.cpp"
NAME = "goat_hf_decode_cpu"
DISABLE_VARIABLE = "GOAT_HF_CPU_KERNEL"

_loaded: Callable[..., torch.Tensor] | None = None
_failure: str | None = None  # why it could not be built, once tried


def kernel_for(weight: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """The kernel for a layer whose base weight this is: fp32 CPU weights only (None for the rest)."""
    return decode_kernel() if weight.device.type == "cpu" and weight.dtype == torch.float32 else None


def decode_kernel() -> Callable[..., torch.Tensor] | None:
    """`decode_forward(x, weight, bias, router_down_t, up_t, top_k, expert_columns) -> [..., m]`, built
    on first call; None, with a warning (once per process) that says why and what to do, where it cannot be built.
    GOAT_HF_CPU_KERNEL is read until the kernel is loaded: set it before a process's first CPU inference."""
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    if os.environ.get(DISABLE_VARIABLE, "1").strip().lower() in {"0", "false", "no", "off"}:
        return None
    if _failure is not None:
        return None
    try:
        _loaded = _build().decode_forward
    except Exception as error:  # noqa: BLE001 - a missing compiler, ninja or header: any of them means "not here"
        _failure = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"goat_hf could not build its CPU decode kernel ({_failure}); GOAT layers decode with ATen ops instead "
            "(the same outputs up to fp32 rounding, about 1.2x slower per token). It needs a C++ compiler and ninja "
            f"(pip install ninja). Set {DISABLE_VARIABLE}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
    return _loaded


def build_failure() -> str | None:
    """Why the kernel could not be built in this process (None: built, or not tried)."""
    return _failure


def _build():
    from torch.utils import cpp_extension  # setuptools machinery: imported only when a kernel is wanted

    build_directory = getattr(cpp_extension, "_get_build_directory", None)  # private: used for the lock and message
    directory = Path(build_directory(NAME, verbose=False)) if build_directory is not None else None
    with _builder_lock(directory):
        if directory is not None and not any(directory.glob(f"{NAME}*.so")):
            logger.warning(
                "goat_hf: compiling the CPU decode kernel, once per machine (~20 s; %s=0 skips)", DISABLE_VARIABLE
            )
        return cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=["-O3"], verbose=False)


@contextmanager
def _builder_lock(directory: Path | None) -> Iterator[None]:
    """One process at a time builds or loads the kernel, under a lock that dies with its holder.

    torch's own lock is a file that its builder deletes when done: a builder killed meanwhile (SIGKILL, SIGTERM, an
    out-of-memory kill during the first evaluation's ~20 s build) leaves it, and every later load then waits for it
    forever, silently. An flock is released by the OS when its process ends, so while holding ours, a torch lock file
    can only be such a leftover (every live goat_hf builder holds ours first; a goat_hf older than this lock does not,
    and could lose its lock if it built at the same moment) and is removed. Not re-entrant: one per load."""
    try:
        import fcntl
    except ImportError:  # Windows: torch's lock alone
        fcntl = None
    if fcntl is None or directory is None:  # (None: a torch without the private helper that names the folder)
        yield
        return
    with open(directory / f"{NAME}.flock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        except OSError:  # a file system without flock (NFS without lockd): torch's lock alone, left as it is
            yield
            return
        leftover = directory / "lock"
        if leftover.exists():
            logger.warning("goat_hf: removing %s, left by a kernel build that was killed before it finished", leftover)
            leftover.unlink(missing_ok=True)
        yield
