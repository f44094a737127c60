"""Gradient-alignment diagnostic: how well does one adapter step imitate one full fine-tuning step?

GOAT's scaling s = √(3nη/d) (Theorem 3.5) is derived so that, with plain SGD and Kaiming-initialised factors
(AᵀA ≈ (d/3n)·I), the weight change a LoRA step implies matches η times full fine-tuning's. This script measures
that on a real batch, per adapted layer, for each scaling and init:

    ΔW_adapter = Σ_j ω_j · (ΔB_j A_j + B_j ΔA_j)      (first order; ω_j = s · mean routing weight of expert j)
    ΔW_full    = the step full fine-tuning takes on W0 with the same optimiser and learning rate

for two optimisers: SGD (ΔP = −lr·g, the theorem's setting) and the first step of Adam (ΔP = −lr·sign(g), what
AdamW does at step one and roughly thereafter). It reports the norm ratio ‖ΔW_adapter‖ / ‖ΔW_full‖ (1 = the
adapter moves the weight as far as full fine-tuning does at the same lr) and the cosine between the two.

    python benchmarks/gradient_alignment.py                   # MiniLM-L6 on a batch of real tweets
    python benchmarks/gradient_alignment.py --report          # only redraw the figure from the JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_tasks import ClassificationCollator, minilm_classifier  # noqa: E402

from goat_hf import GoatConfig, get_goat_model, goat_layers, record_routing  # noqa: E402, record_routing
from goat_hf.tasks.tweets import tweet_splits  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "LoRA (E=1, Kaiming A, zero B, α/r)": {"num_experts": 1, "top_k": 1, "init": "zero", "scaling": "alpha"},
    "PiSSA (E=1, top-r SVD, α/r)": {"num_experts": 1, "top_k": 1, "init": "pissa", "scaling": "alpha", "rho": 1.0},
    "MoLoRA (zero, α/d)": {"init": "zero", "scaling": "alpha"},
    "GOAT s=√(3nη/d), η=1": {},
    "GOAT s=√(3nη/d), η=0.1": {"eta": 0.1},
    "GOAT α/d": {"scaling": "alpha"},
    "GOAT α/√d": {"scaling": "rslora"},
    "GOAT init=zero, s=√(3nη/d)": {"init": "zero"},
    "GOAT aligned, η=1": {"scaling": "aligned"},
    "GOAT init=pissa, aligned, η=1": {"scaling": "aligned", "init": "pissa"},
    "MoLoRA (zero), aligned, η=1": {"scaling": "aligned", "init": "zero"},
}


def full_gradients(model: torch.nn.Module, batch: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """∂L/∂W0 of each named Linear, full fine-tuning's gradient on this batch."""
    model.zero_grad()
    model(**batch).loss.backward()
    return {name: model.get_submodule(name).weight.grad.detach().clone() for name in names}


def implied_update(layer: Any, optimiser: str, lr: float) -> torch.Tensor:
    """First-order change of the layer's token-averaged effective weight after one step on its experts."""
    E, d = layer.num_experts, layer.expert_rank
    step = {"sgd": lambda g: -lr * g, "adam": lambda g: -lr * torch.sign(g)}[optimiser]
    dA, dB = step(layer.expert_A.grad), step(layer.expert_B.grad)
    gates = torch.zeros(layer.routing.probs.shape, dtype=torch.float32)
    gates.scatter_(1, layer.routing.top_experts, layer.routing.probs.gather(1, layer.routing.top_experts))
    gates = gates / gates.sum(-1, keepdim=True)
    omega = layer.scaling * gates.mean(0)  # [E]  s times each expert's mean routing weight over the batch
    A, B = layer.expert_A.detach().view(E, d, -1), layer.expert_B.detach().view(-1, E, d)
    dA, dB = dA.view(E, d, -1), dB.view(-1, E, d)
    return sum(omega[j] * (dB[:, j] @ A[j] + B[:, j] @ dA[j]) for j in range(E))


def measure(variant: dict[str, Any], batch: dict[str, torch.Tensor], lr: float, r: int, seed: int) -> dict[str, Any]:
    set_seed(seed)
    model, _ = minilm_classifier()
    config = GoatConfig(r=r, seed=seed, aux_loss_coef=0.0, **variant)
    names = list(goat_layers(get_goat_model(minilm_classifier()[0], config)))
    set_seed(seed)
    full_model, _ = minilm_classifier()
    full = full_gradients(full_model, batch, names)
    get_goat_model(model, config)
    model.zero_grad()
    with record_routing(model):  # an eval-mode model (no dropout) keeps its routing record only on request
        model(**batch).loss.backward()
    layers = goat_layers(model)
    result: dict[str, Any] = {"scaling": {name: layers[name].scaling for name in names}}
    for optimiser in ("sgd", "adam"):
        ratios, cosines = {}, {}
        for name in names:
            full_step = -lr * full[name] if optimiser == "sgd" else -lr * torch.sign(full[name])
            delta = implied_update(layers[name], optimiser, lr)
            ratios[name] = (delta.norm() / full_step.norm()).item()
            cosines[name] = torch.nn.functional.cosine_similarity(delta.flatten(), full_step.flatten(), dim=0).item()
        result[optimiser] = {
            "norm_ratio": ratios,
            "cosine": cosines,
            "mean_norm_ratio": statistics.mean(ratios.values()),
            "median_norm_ratio": statistics.median(ratios.values()),
            "mean_cosine": statistics.mean(cosines.values()),
        }
    return result


def plot(results: dict[str, Any], path: Path) -> None:
    """Per adapted layer, for each variant: how far (norm ratio, log scale) and in which direction (cosine) one
    AdamW step moves the weight compared with full fine-tuning's step. The averages hide that the ratio varies by
    layer type (s doubles on the 1536 → 384 projections)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ratio_axis, cosine_axis) = plt.subplots(1, 2, figsize=(13, 4.8), sharex=True)
    for index, (name, res) in enumerate(results.items()):
        layers = list(res["adam"]["norm_ratio"])
        style = {"label": name, "linewidth": 1, "color": plt.cm.tab20(index), "linestyle": "--" if index % 2 else "-"}
        ratio_axis.plot(range(len(layers)), [res["adam"]["norm_ratio"][n] for n in layers], **style)
        cosine_axis.plot(range(len(layers)), [res["adam"]["cosine"][n] for n in layers], **style)
    ratio_axis.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ratio_axis.set_yscale("log")
    ratio_axis.set_ylabel("‖ΔW_adapter‖ / ‖ΔW_full‖ (1 = as far as full FT)")
    cosine_axis.set_ylabel("cos(ΔW_adapter, ΔW_full)")
    for axis in (ratio_axis, cosine_axis):
        axis.set_xlabel("adapted layer (6 per block, input to output)")
    cosine_axis.legend(fontsize=7)
    fig.suptitle("One AdamW step against full fine-tuning's, per layer (MiniLM-L6, 32 real tweets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4, help="The learning rate of both steps (η = 1).")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--report", action="store_true", help="Only redraw the figure from the JSON in --out.")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads((args.out / "gradient_alignment.json").read_text())
        plot(results, args.out / "gradient_alignment.png")
        return results
    torch.set_num_threads(1)
    _, tokenizer = minilm_classifier()
    rows = tweet_splits(1500, 500, 1000, pool=0).train[: args.batch]
    batch = ClassificationCollator(tokenizer, 64)(rows)
    results = {
        name: measure(variant, batch, args.lr, args.r, args.seed)
        for name, variant in VARIANTS.items()
        if name in args.variants
    }
    print(
        f"One step at lr {args.lr:g} on {args.batch} real tweets, MiniLM-L6, total rank {args.r}: "
        "‖ΔW_adapter‖ / ‖ΔW_full‖ and cos(ΔW_adapter, ΔW_full), averaged over the adapted layers"
    )
    print("| variant | s (median over layers) | SGD norm ratio | SGD cosine | Adam norm ratio | Adam cosine |")
    print("|---|---|---|---|---|---|")
    for name, res in results.items():
        scaling = statistics.median(res["scaling"].values())
        print(
            f"| {name} | {scaling:.3g} | {res['sgd']['mean_norm_ratio']:.3g} | {res['sgd']['mean_cosine']:.3f} | "
            f"{res['adam']['mean_norm_ratio']:.3g} | {res['adam']['mean_cosine']:.3f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gradient_alignment.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "gradient_alignment.png")
    return results


if __name__ == "__main__":
    main()
