"""What loading costs when a GOAT adapter is served: the exported folder against its base alone, SmolLM2-135M.

Why: issue 24 and docs/guides/serving.md. `transformers serve` loads an exported folder (goat_hf.export_for_serving)
through its goat_modeling.py: the base, then the adapter on it (its base fingerprints checked), then
prepare_for_inference. This times `AutoModelForCausalLM.from_pretrained` of the base folder and of the exported
folder (GOAT E = 8, top-2, r = 8, every Linear but the head) in one process, one thread, fp32, CPU, alternating,
after one warm-up load of each; with --serve also the `transformers serve` start (the command line a user runs,
until /health answers), alternating. Medians over the rounds.

    python benchmarks/bench_serve_load.py --serve --out benchmarks/results/bench_serve_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from goat_hf import GoatConfig, export_for_serving, get_goat_model, save_goat_adapter
from goat_hf.tasks.assets import smollm2_path

GOAT = GoatConfig(r=8, num_experts=8, top_k=2, target_modules="all-linear", seed=1)
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the goat_hf the server processes import


def export(base: Path, work: Path) -> Path:
    model = get_goat_model(AutoModelForCausalLM.from_pretrained(base), GOAT)
    save_goat_adapter(model, work / "adapter")
    return export_for_serving(work / "adapter", work / "served", base_model=base)


def load_seconds(folder: Path) -> float:
    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    return time.perf_counter() - start


def serve_start_seconds(folder: Path, limit_s: float = 600) -> float:
    """Seconds from `transformers serve <folder>` to a 200 from /health; the server is stopped after."""
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(SOURCE_ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--trust-remote-code"]
    start = time.perf_counter()
    command += ["--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < limit_s and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    return time.perf_counter() - start
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"transformers serve {folder} did not start (exit code {server.poll()})")
    finally:
        server.terminate()
        server.wait(timeout=60)


def medians(timings: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(statistics.median(values), 3) for name, values in timings.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="loads of each, alternating")
    parser.add_argument("--serve", action="store_true", help="also time `transformers serve` starts")
    parser.add_argument("--serve_rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = smollm2_path()
    with tempfile.TemporaryDirectory() as work:
        folders = {"base": base, "goat export": export(base, Path(work))}
        for folder in folders.values():  # warm-up: file cache, goat_modeling.py copied and imported
            load_seconds(folder)
        loads = {name: [] for name in folders}
        for _ in range(args.rounds):
            for name, folder in folders.items():
                loads[name].append(load_seconds(folder))
        starts = {name: [] for name in folders}
        for _ in range(args.serve_rounds if args.serve else 0):
            for name, folder in folders.items():
                starts[name].append(serve_start_seconds(folder))
    results = {
        "from_pretrained_s": medians(loads),
        "serve_start_s": medians(starts) if args.serve else None,
        "raw": {"from_pretrained_s": loads, "serve_start_s": starts},
        "setup": {"model": "SmolLM2-135M-Instruct", "goat": GOAT.to_dict(), "rounds": args.rounds},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
    }
    print(json.dumps({key: results[key] for key in ("from_pretrained_s", "serve_start_s")}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
