"""FSDP2 / DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes vs a single process: how far apart the adapters end.

Runs tests/sharded_worker.py (a tiny Llama, 4 steps, global batch 4 = 2 ranks x 2) under each backend, and the
single-process GoatTrainer on the same data as 2 micro-batches of 2 (gradient accumulation: what the ranks
compute) and as one batch of 4; under FSDP2 also GoatSFTTrainer (2 steps, fp32) against its single-process
run. Prints the largest per-tensor relative difference ||a - b|| / ||b|| over the adapter (experts, routers,
residual factors). `python benchmarks/bench_sharded.py [--backends fsdp2 zero2 zero3]`
(~1 min per backend on 2 CPU cores; ZeRO needs `pip install deepspeed`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from sharded_checks import adapter_file, largest_difference, reference, run_worker, sft_reference  # noqa: E402
from sharded_worker import COEFS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["fsdp2", "zero2", "zero3"], choices=sorted(COEFS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        references = {  # global batch 4: per-device batch 4 // accumulation
            (coef, acc): reference(tmp / f"ref{coef}-{acc}", coef, 4 // acc, acc)[0]
            for coef in (0.0, 0.1)
            for acc in (1, 2)
        }
        for backend in args.backends:
            out = run_worker(tmp / backend, backend)
            for coef in COEFS[backend]:
                final = adapter_file(out / f"aux{coef:g}" / "final")
                rows.append(
                    f"| {backend} | {coef:g} | {largest_difference(final, references[coef, 2]):.1e} | "
                    f"{largest_difference(final, references[coef, 1]):.1e} | "
                    f"{largest_difference(adapter_file(out / 'resumed'), adapter_file(out / 'aux0.1' / 'final')):.1e} |"
                )
            for coef in COEFS[backend] if backend == "fsdp2" else ():  # GoatSFTTrainer, 2 steps, fp32
                expected, _ = sft_reference(tmp / f"sft-ref{coef}", coef)
                final = adapter_file(out / f"sft{coef:g}" / "final")
                rows.append(f"| {backend}, GoatSFTTrainer | {coef:g} | {largest_difference(final, expected):.1e} | | |")
    print("| backend | aux_loss_coef | vs 1 process, 2 x 2 (GA) | vs 1 process, 1 x 4 | resumed vs uninterrupted |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
