"""GOAT on SmolLM2-135M, offline: inject, count parameters, show routing, save, reload, compare logits.

python examples/quickstart_smollm2.py [--output_dir outputs/quickstart]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from goat_hf import (
    GoatConfig,
    get_goat_model,
    goat_layers,
    load_goat_adapter,
    print_trainable_parameters,
    record_routing,
    save_goat_adapter,
)
from goat_hf.tasks.assets import smollm2_path

SENTENCE = "GOAT routes every token to two of eight experts."


def show_routing(model: torch.nn.Module, tokens: list[str], every: int) -> None:
    """One line per layer (every `every`-th q_proj): the top-k experts each token was routed to."""
    for name, layer in goat_layers(model).items():
        if not name.endswith("self_attn.q_proj"):
            continue
        index = int(name.split(".layers.")[1].split(".")[0])
        if index % every:
            continue
        picks = layer.routing.top_experts.tolist()  # [T, k]
        cells = " ".join(f"{tok.strip() or '_'}:{'+'.join(map(str, p))}" for tok, p in zip(tokens, picks, strict=True))
        print(f"  layer {index:2d} q_proj  {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/quickstart")
    args = parser.parse_args()

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()

    start = time.perf_counter()
    get_goat_model(model, GoatConfig())  # the paper's defaults: E=8, k=2, r=8, all linear layers
    print(f"Injected {len(goat_layers(model))} GOAT layers in {time.perf_counter() - start:.1f} s (SVD init)")
    print_trainable_parameters(model)

    inputs = tokenizer(SENTENCE, return_tensors="pt")
    with torch.no_grad(), record_routing(model):  # evaluation keeps no routing record unless asked
        logits = model(**inputs).logits
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    print(f"Experts each token of {SENTENCE!r} is routed to (token:expert+expert):")
    show_routing(model, [tokenizer.convert_tokens_to_string([t]) for t in tokens], every=6)

    folder = save_goat_adapter(model, args.output_dir)
    fresh = AutoModelForCausalLM.from_pretrained(path).eval()
    start = time.perf_counter()
    load_goat_adapter(fresh, folder)
    print(f"Saved the adapter to {folder} and reloaded it onto a fresh base in {time.perf_counter() - start:.2f} s")
    with torch.no_grad():
        reloaded = fresh(**inputs).logits
    difference = (logits - reloaded).abs().max()
    print(f"Reloaded logits identical: {torch.equal(logits, reloaded)} (max |diff| {difference:.1e})")


if __name__ == "__main__":
    main()
