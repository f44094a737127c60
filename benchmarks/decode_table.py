"""The README's decode table, regenerated from bench_decode's results JSON (eager, and compiled when present), each
GOAT ratio with its 95 % interval.

Why: a table typed by hand drifts from the measurement it quotes. `--write` rewrites the block between the
`decode-table` markers in README.md; without it the script exits 1 when the README differs (tests/test_docs.py).

    python benchmarks/decode_table.py --write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pairing import paired_ratio, ratio_interval

ROOT = Path(__file__).resolve().parent.parent
RESULTS = {  # the runs whose variants take turns step by step (bench_decode.py --interleave steps): the tightest
    "eager": ROOT / "benchmarks/results/bench_decode_cpu_steps.json",
    "compiled": ROOT / "benchmarks/results/bench_decode_cpu_compiled_steps.json",
}
START, END = "<!-- decode-table:start -->", "<!-- decode-table:end -->"
COLUMNS = ("merged", "lora", "goat", "goat prepared")


def render() -> str:
    lines = [
        "| mode | batch | merged base | PEFT LoRA unmerged | GOAT | GOAT prepared |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mode, path in RESULTS.items():
        if not path.exists():
            continue
        for batch, result in json.loads(path.read_text())["results"].items():
            ms, seconds = result["ms_per_token"], result["seconds_per_token"]
            cells = []
            for name in COLUMNS:
                cell = f"{ms[name]:.1f}" if name in ms else "n/a"
                if name.startswith("goat") and name in ms:
                    low, high = ratio_interval(result, name, "merged")
                    cell += f" ({paired_ratio(seconds, name, 'merged'):.3f}×, {low:.3f}–{high:.3f})"
                cells.append(cell)
            lines.append(f"| {mode} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, table: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite README.md's table")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    text = args.readme.read_text()
    updated = replace_block(text, render())
    if args.write:
        args.readme.write_text(updated)
        return 0
    if updated != text:
        print(f"{args.readme}'s decode table differs from benchmarks/results: run {sys.argv[0]} --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
