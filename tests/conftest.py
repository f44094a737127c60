"""Shared fixtures: offline Hub, a fixed seed, tiny models built from configs, and the per-expert reference."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the Hub (DESIGN §6)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from goat_hf import GoatConfig, GoatLinear, goat_layers  # noqa: E402

SEED = 1234
VOCAB = 100


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """Tiny models gain nothing from a thread pool, and on a shared two-core machine two OpenMP threads fighting
    for busy cores make the fast suite ~10x slower (tiny SVDs crawl). Results are compared within one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fixed_seed() -> None:
    torch.manual_seed(SEED)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 64, MLP 128, 4 heads, 2 KV heads: k/v_proj are 64 -> 32), weights from `seed`."""
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def tiny_classifier(kind: str = "bert", num_labels: int = 2, seed: int = 0, **overrides):
    """A 2-layer BERT or RoBERTa sequence classifier (hidden 64, MLP 128, 4 heads), weights from `seed`."""
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(**settings)).eval()
    if kind == "roberta":
        settings.update(pad_token_id=1, max_position_embeddings=66)  # RoBERTa positions start after pad_token_id
        return RobertaForSequenceClassification(RobertaConfig(**settings)).eval()
    raise ValueError(kind)


def token_batch(batch: int = 2, length: int = 7, seed: int = 7) -> dict[str, torch.Tensor]:
    """input_ids in [3, VOCAB) and an attention mask whose second row ends in two padding tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        attention_mask[1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def llama_factory():
    return tiny_llama


@pytest.fixture
def classifier_factory():
    return tiny_classifier


@pytest.fixture
def make_model():
    """make(kind): a tiny "causal-lm" Llama, or a "bert-cls" / "roberta-cls" sequence classifier."""

    def make(kind: str = "causal-lm"):
        return tiny_llama() if kind == "causal-lm" else tiny_classifier(kind.removesuffix("-cls"))

    return make


def svd_residual(weight: torch.Tensor, config: GoatConfig, seed: int = 0) -> torch.Tensor:
    """W_res = W0 - (c/rho) * sum_j U_j S_j V_j^T (fp64), from an SVD of W0 computed here, with the segments of
    DESIGN §2 written out (for init="random" the starts a Generator seeded with `seed` draws first); W0 for "zero"."""
    W0 = weight.detach().to(torch.float64)
    if config.init == "zero":
        return W0
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    h, E, d, r = S.shape[0], config.num_experts, config.expert_rank, config.r
    t = h // E
    starts = {
        "goat": [j * t for j in range(E)],
        "goat_mini": [(j + 1) * t - d for j in range(E)],
        "pissa": [j * d for j in range(E)],
        "milora": [h - r + j * d for j in range(E)],
    }.get(config.init)
    if starts is None:  # "random": the first draw of the seeded generator, as GoatLinear.from_linear makes it
        starts = torch.randint(0, h - d + 1, (E,), generator=torch.Generator().manual_seed(seed)).tolist()
    index = torch.cat([torch.arange(start, start + d) for start in starts])
    c = 1.0 / E if config.init_cof is None else config.init_cof
    return W0 - (c / config.rho) * (U[:, index] * S[index]) @ Vh[index]


def reference_goat_forward(
    layer: GoatLinear,
    x: torch.Tensor,
    W_res: torch.Tensor,
    expert_inputs: list[torch.Tensor] | None = None,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GOAT written straight from DESIGN §2, one token and one expert at a time: (y, balance loss).

        y = W_res x + sum_{j in top-k} w_j * s * B_j A_j x_j

    `W_res` comes from the caller (e.g. `svd_residual`), never from the layer's own residual buffers; the balance
    loss counts the tokens where `token_mask` ([..] over x.shape[:-1]) is 1, all of them by default.
    `expert_inputs[j]` ([T, n]) is what expert j sees (dropout(x)); default x itself. Computed in fp64 and
    differentiable w.r.t. the layer's expert_A, expert_B and router.weight. The output is cast like the
    layer's: the base output W0 x (+ bias) in the base dtype plus the rest cast to the base dtype.
    """
    base = layer.base_layer
    dtype = base.weight.dtype
    cdt = torch.float64
    E, d, s = layer.num_experts, layer.expert_rank, layer.scaling
    n, m = base.in_features, base.out_features
    tokens = x.reshape(-1, n).to(cdt)  # [T, n]
    W0 = base.weight.detach().to(cdt)  # [m, n]
    bias = base.bias.detach().to(cdt) if base.bias is not None else torch.zeros(m, dtype=cdt)
    W_res = W_res.to(cdt)

    A, B, router = layer.expert_A.to(cdt), layer.expert_B.to(cdt), layer.router.weight.to(cdt)
    inputs = [tokens] * E if expert_inputs is None else [xj.reshape(-1, n).to(cdt) for xj in expert_inputs]
    rows, probs, picks = [], [], []
    for t in range(tokens.shape[0]):
        p = torch.softmax(router @ tokens[t], dim=0)  # [E]
        chosen = torch.topk(p.detach(), layer.top_k).indices.tolist()
        norm = sum(p[j] for j in chosen)
        y = W_res @ tokens[t]
        for j in chosen:
            B_j, A_j = B[:, j * d : (j + 1) * d], A[j * d : (j + 1) * d]
            y = y + (p[j] / norm) * s * (B_j @ (A_j @ inputs[j][t]))
        rows.append(y)
        probs.append(p)
        picks.append(torch.tensor([float(j in chosen) for j in range(E)], dtype=cdt))
    y_full = torch.stack(rows) + bias  # [T, m]

    base_out = tokens @ W0.T + bias
    out = base_out.to(dtype) + (y_full - base_out).to(dtype)
    out = out.reshape(*x.shape[:-1], m)

    real = torch.ones(tokens.shape[0], dtype=cdt) if token_mask is None else token_mask.reshape(-1).to(cdt)
    f = sum(real[t] * picks[t] for t in range(len(picks))) / real.sum()  # [E] picks per real token
    P = sum(real[t] * probs[t] for t in range(len(probs))) / real.sum()  # [E] mean probability
    balance = E * sum(f[j] * P[j] for j in range(E))
    return out, balance


def perturb_(*tensors: torch.Tensor, std: float = 0.1, seed: int = 99) -> None:
    """Move parameters away from their init (a trained-like state): add N(0, std^2) noise, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors:
            tensor.add_(std * torch.randn(tensor.shape, generator=generator).to(tensor.dtype))


def train_like_(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Perturb every GOAT layer's experts and router, and the modules_to_save, as training would (seeded)."""
    for i, layer in enumerate(goat_layers(model).values()):
        perturb_(layer.expert_A, layer.expert_B, layer.router.weight, std=std, seed=i)
    for i, name in enumerate(model.goat_state.modules_to_save):
        perturb_(*model.get_submodule(name).parameters(), std=std, seed=10_000 + i)
    return model


def forbid_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on any SVD fails the test: loading an adapter must rebuild every layer from the file."""

    def refuse(*args, **kwargs):
        raise AssertionError("loading an adapter must not compute an SVD")

    for module, name in [(torch.linalg, "svd"), (torch, "svd"), (torch.linalg, "svdvals"), (torch, "svd_lowrank")]:
        monkeypatch.setattr(module, name, refuse)


def plain_linear_forward(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """W0 x + b exactly as nn.Linear computes it."""
    return F.linear(x, linear.weight, linear.bias)
