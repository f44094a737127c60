"""GoatTrainer / GoatTrainerMixin / GoatSFTTrainer: injection, the balance loss, gradient accumulation, optimizer
groups, adapter-only checkpoints, activation checkpointing, DDP and TRL (DESIGN §5)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import perturb_
from cpu_sharding import torchrun
from safetensors.torch import load_file
from trainer_fixtures import adapter_copy, as_batch, classification_dataset, cpu_args, lm_dataset, single_thread
from transformers import LlamaForCausalLM, TrainerCallback, TrainingArguments

from goat_hf import GoatConfig, GoatLinear, GoatTrainer, GoatTrainingArguments, get_goat_model, goat_layers
from goat_hf.adapter_io import CONFIG_NAME, LAYER_TENSORS, RESIDUAL_TENSORS, WEIGHTS_NAME, load_goat_adapter

TESTS = Path(__file__).parent
FULL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
HEALTH_KEYS = ("aux_loss", "task_loss", "router_load_min", "router_load_max", "router_load_entropy")
SMALL = GoatConfig(r=8, num_experts=4, top_k=2)  # d = 2: cheaper than the paper defaults where they do not matter
KINDS = ("causal-lm", "bert-cls", "roberta-cls")
DATASETS = {"causal-lm": lm_dataset, "bert-cls": classification_dataset, "roberta-cls": classification_dataset}


one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture
def make_model(llama_factory, classifier_factory):
    def make(kind: str = "causal-lm"):
        return llama_factory() if kind == "causal-lm" else classifier_factory(kind.removesuffix("-cls"))

    return make


def training_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def balance_losses(model) -> list[torch.Tensor]:
    return [layer.routing.balance_loss for layer in goat_layers(model).values()]


def router_grads(model) -> dict[str, torch.Tensor]:
    return {
        name: layer.router.weight.grad.clone() if layer.router.weight.grad is not None else torch.zeros(1)
        for name, layer in goat_layers(model).items()
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


# ---- 1. the one-line swap ----


def test_class_name_swap_injects_paper_defaults_trains_and_logs_routing_health(make_model, tmp_path):
    model = make_model()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = GoatTrainer(model=model, args=args, train_dataset=lm_dataset())

    assert trainer.model is model and type(model) is LlamaForCausalLM
    assert model.goat_state.config == GoatConfig()
    layers = goat_layers(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers; never lm_head
    assert {(layer.num_experts, layer.top_k, layer.expert_rank) for layer in layers.values()} == {(8, 2, 1)}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith((".expert_A", ".expert_B", ".router.weight")) for name in trainable)
    before = {name: t.clone() for name, t in model.state_dict().items()}

    trainer.train()

    after = model.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == trainable  # the adapters learned; base weights, residual factors and lm_head did not move
    logs = training_logs(trainer)
    assert len(logs) == 2
    for entry in logs:
        assert set(HEALTH_KEYS) <= entry.keys()
        assert entry["loss"] - entry["task_loss"] == pytest.approx(1e-3 * entry["aux_loss"], abs=2e-4)
        assert entry["router_load_min"] <= 1 / 8 <= entry["router_load_max"]
        assert 0 < entry["router_load_entropy"] <= 1
    assert list(trainer.routing_loads) == list(layers)


# ---- 2. the balance loss: formula, coefficient, gradient ----


def routing_free_trainer(model, tmp_path, aux_loss_coef: float, **arg_overrides) -> GoatTrainer:
    """Routers at zero (uniform routing) and expert B at zero, so that the task loss does not depend on routing."""
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=aux_loss_coef)
    trainer = GoatTrainer(
        model=model, args=cpu_args(tmp_path, **arg_overrides), train_dataset=lm_dataset(), goat_config=config
    )
    with torch.no_grad():
        for layer in goat_layers(model).values():
            layer.router.weight.zero_()
            layer.expert_B.zero_()
    return trainer


def capture_inputs(model) -> dict[str, torch.Tensor]:
    """The input of every GOAT layer at its latest forward, by layer name."""
    inputs: dict[str, torch.Tensor] = {}
    for name, layer in goat_layers(model).items():
        layer.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0].detach()))
    return inputs


def formula_balance_loss(layer: GoatLinear, x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """E * sum_j f_j P_j over the tokens of x (no padding), written from the formula; differentiable in the router."""
    tokens = x.reshape(-1, layer.in_features).float()  # [T, n]
    probs = torch.softmax(tokens @ router_weight.T, dim=-1)  # [T, E]
    picks = torch.zeros_like(probs).scatter_(1, probs.detach().topk(layer.top_k, dim=-1).indices, 1.0)  # [T, E]
    return layer.num_experts * (picks.mean(0) * probs.mean(0)).sum()  # f_j = picks per token, P_j = mean prob


@pytest.mark.parametrize("coef", [0.0, 0.5], ids=["coef0", "coef0.5"])
def test_balance_loss_on_uniform_routing_is_top_k_per_layer_and_reaches_the_router(make_model, tmp_path, coef):
    model = make_model()
    trainer = routing_free_trainer(model, tmp_path, coef)
    inputs = capture_inputs(model)
    batch = as_batch(lm_dataset(num_examples=2))

    loss = trainer.compute_loss(model.train(), batch)
    per_layer = torch.stack(balance_losses(model))
    loss.backward()
    expected_grads = {}
    for name, layer in goat_layers(model).items():
        W = layer.router.weight.detach().clone().requires_grad_(True)
        (expected_grads[name],) = torch.autograd.grad(coef * formula_balance_loss(layer, inputs[name], W), W)
    with torch.no_grad():
        task = model(**batch).loss

    # Uniform routing: P_j = 1/E, so each layer gives E * sum_j f_j / E = sum_j f_j = top_k.
    torch.testing.assert_close(per_layer, torch.full((14,), 2.0))
    assert (loss - task).item() == pytest.approx(coef * 2.0 * 14, abs=1e-5)
    grads = router_grads(model)
    if coef == 0:  # the task loss does not depend on routing here: nothing else reaches the router
        assert all(torch.count_nonzero(g) == 0 for g in grads.values())
        return
    for name, grad in grads.items():
        assert expected_grads[name].abs().max() > 1e-4
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7)


def test_aux_loss_is_the_sum_of_each_layers_formula_on_uneven_routing(make_model, tmp_path):
    coef = 0.5
    model = make_model()
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=coef)
    trainer = GoatTrainer(model=model, args=cpu_args(tmp_path), train_dataset=lm_dataset(), goat_config=config)
    layers = goat_layers(model)
    perturb_(*(layer.router.weight for layer in layers.values()), std=1.0)  # peaked, uneven routing
    inputs = capture_inputs(model)
    batch = as_batch(lm_dataset(num_examples=2))

    with torch.no_grad():
        loss = trainer.compute_loss(model.train(), batch)
        per_layer = torch.stack(balance_losses(model))
        expected = torch.stack(
            [formula_balance_loss(layer, inputs[name], layer.router.weight) for name, layer in layers.items()]
        )
        task = model(**batch).loss

    assert expected.max() > 2.1  # uneven: uniform routing would give top_k = 2 in every layer
    torch.testing.assert_close(per_layer, expected)
    assert (loss - task).item() == pytest.approx(coef * expected.sum().item(), abs=1e-4)


def test_logged_loss_is_task_loss_plus_coef_times_aux(make_model, tmp_path):
    coef = 0.5
    trainer = routing_free_trainer(make_model(), tmp_path, coef, max_steps=1)
    trainer.train()
    (entry,) = training_logs(trainer)
    assert entry["aux_loss"] == pytest.approx(2.0 * 14)  # uniform routing: top_k per layer, 14 layers
    assert entry["loss"] - entry["task_loss"] == pytest.approx(coef * entry["aux_loss"], abs=1e-4)


# ---- 3. gradient accumulation ----


def sgd_args(tmp_path, micro_batch: int, accumulation: int, args_class: type = TrainingArguments, **overrides):
    """One plain SGD step (no clipping, no decay, constant lr) over the dataset in order."""
    return cpu_args(
        tmp_path,
        args_class,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_steps=1,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        train_sampling_strategy="sequential",
        **overrides,
    )


def trainer_step(model, dataset, config, tmp_path, micro_batch: int, accumulation: int) -> dict[str, torch.Tensor]:
    trainer = GoatTrainer(
        model=model, args=sgd_args(tmp_path, micro_batch, accumulation), train_dataset=dataset, goat_config=config
    )
    trainer.train()
    return adapter_copy(model)


def reference_step(model, dataset, config, micro_batch: int, lr: float = 1.0) -> dict[str, torch.Tensor]:
    """SGD on the task loss of the whole batch plus aux_loss_coef times the mean of the micro-batches' balance
    losses (a per-forward statistic, accumulated like a micro-batch mean loss)."""
    get_goat_model(model, config).train()
    task = model(**as_batch(dataset)).loss  # mean over the whole batch
    aux = []
    for start in range(0, len(dataset), micro_batch):
        model(**as_batch(dataset.select(range(start, start + micro_batch))))
        aux.append(sum(balance_losses(model)))
    (task + config.aux_loss_coef * torch.stack(aux).mean()).backward()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param -= lr * param.grad
    return adapter_copy(model)


@pytest.mark.parametrize("kind", KINDS)
def test_accumulated_micro_batches_equal_one_big_batch(make_model, tmp_path, kind):
    dataset = DATASETS[kind](num_examples=4)
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=0.0)
    start = make_model(kind)
    get_goat_model(start, config)
    start = adapter_copy(start)

    accumulated = trainer_step(make_model(kind), dataset, config, tmp_path / "ga", micro_batch=2, accumulation=2)
    big_batch = trainer_step(make_model(kind), dataset, config, tmp_path / "big", micro_batch=4, accumulation=1)

    assert max_difference(accumulated, start) > 1e-3  # a real step
    assert max_difference(accumulated, big_batch) < 1e-5


@pytest.mark.parametrize("accumulation", [1, 2], ids=["ga1", "ga2"])
@pytest.mark.parametrize("kind", KINDS)
def test_accumulation_scales_the_aux_term_like_the_task_loss(make_model, tmp_path, kind, accumulation):
    dataset = DATASETS[kind](num_examples=4)
    micro_batch = 4 // accumulation
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=0.1)

    trained = trainer_step(make_model(kind), dataset, config, tmp_path, micro_batch, accumulation)
    expected = reference_step(make_model(kind), dataset, config, micro_batch)
    without_aux = reference_step(
        make_model(kind), dataset, GoatConfig(r=8, num_experts=4, aux_loss_coef=0.0), micro_batch
    )

    assert max_difference(expected, without_aux) > 1e-3  # the aux term is visible in the update
    assert max_difference(trained, expected) < 1e-5


# ---- 4. padding ----


def pad_right(batch: dict[str, torch.Tensor], extra: int, pad_id: int) -> dict[str, torch.Tensor]:
    rows = batch["input_ids"].shape[0]
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.full((rows, extra), pad_id)], dim=1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(rows, extra, dtype=torch.long)], dim=1),
    }
    labels = batch["labels"]
    padded["labels"] = torch.cat([labels, torch.full((rows, extra), -100)], dim=1) if labels.dim() == 2 else labels
    return padded


@pytest.mark.parametrize("kind", ["causal-lm", "bert-cls"])
def test_padding_changes_neither_the_balance_loss_nor_the_training_loss(make_model, tmp_path, kind):
    model = make_model(kind)
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=0.1)
    trainer = GoatTrainer(model=model, args=cpu_args(tmp_path), train_dataset=DATASETS[kind](), goat_config=config)
    plain = as_batch(DATASETS[kind](num_examples=2, length=6))
    padded = pad_right(plain, extra=5, pad_id=model.config.pad_token_id)
    model.train()

    with torch.no_grad():
        loss_plain = trainer.compute_loss(model, plain)
        aux_plain = torch.stack(balance_losses(model))
        loss_padded = trainer.compute_loss(model, padded)
        aux_padded = torch.stack(balance_losses(model))
        model(**{**padded, "attention_mask": torch.ones_like(padded["attention_mask"])})  # padding counted
        aux_unmasked = torch.stack(balance_losses(model))

    torch.testing.assert_close(aux_padded, aux_plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss_padded, loss_plain, rtol=0, atol=1e-5)
    assert (aux_unmasked - aux_plain).abs().max() > 1e-3  # padding would show if it were not excluded


# ---- 5. evaluation ----


@pytest.mark.parametrize("kind", ["causal-lm", "bert-cls"])
def test_evaluation_loss_is_the_task_loss_without_aux(make_model, tmp_path, kind):
    model = make_model(kind)
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=1.0)
    eval_dataset = DATASETS[kind](num_examples=4, seed=3)
    trainer = GoatTrainer(
        model=model,
        args=cpu_args(tmp_path, per_device_eval_batch_size=4),
        train_dataset=DATASETS[kind](),
        eval_dataset=eval_dataset,
        goat_config=config,
    )

    eval_loss = trainer.evaluate()["eval_loss"]

    batch = as_batch(eval_dataset)
    with torch.no_grad():
        task = model.eval()(**batch).loss.item()
        training_loss = trainer.compute_loss(model.train(), batch).item()
    assert eval_loss == pytest.approx(task, abs=1e-5)
    assert training_loss - task == pytest.approx(sum(balance_losses(model)).item(), abs=1e-4)  # coef 1
    assert training_loss - task > 1.0


# ---- 6. optimizer groups ----


def groups_by_name(trainer, model) -> dict[str, tuple[set[str], float, float]]:
    names = {id(param): name for name, param in model.named_parameters()}
    optimizer = trainer.create_optimizer()
    return {
        group["name"]: ({names[id(p)] for p in group["params"]}, group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
    }


def test_optimizer_groups_by_name_with_router_lr_and_no_decay_for_router_biases_and_norms(make_model, tmp_path, caplog):
    model = make_model("bert-cls")
    args = cpu_args(
        tmp_path,
        GoatTrainingArguments,
        learning_rate=1e-3,
        weight_decay=0.01,
        router_learning_rate=5e-3,
        goat_r=8,
        goat_num_experts=4,
        goat_modules_to_save=["classifier", "embeddings.LayerNorm"],
    )
    trainer = GoatTrainer(model=model, args=args, train_dataset=classification_dataset())
    caplog.set_level(logging.INFO, logger="goat_hf.trainer")

    groups = groups_by_name(trainer, model)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    experts = {name for name in trainable if name.endswith((".expert_A", ".expert_B"))}
    routers = {name for name in trainable if name.endswith(".router.weight")}
    assert list(groups) == ["experts", "router", "head", "head_no_decay"]
    assert groups["experts"] == (experts, 1e-3, 0.01)
    assert groups["router"] == (routers, 5e-3, 0.0)
    assert groups["head"] == ({"classifier.weight"}, 1e-3, 0.01)
    no_decay = {"classifier.bias", "bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias"}
    assert groups["head_no_decay"] == (no_decay, 1e-3, 0.0)
    grouped = [name for names, _, _ in groups.values() for name in names]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter once, no frozen base weight
    assert len(experts) == len(routers) * 2 == 2 * (2 * 6 + 1)  # 6 Linears in each of 2 layers, and the pooler
    messages = [r.getMessage() for r in caplog.records if "GOAT optimizer groups" in r.getMessage()]
    assert len(messages) == 1 and "router:" in messages[0] and "lr 0.005" in messages[0]


@pytest.mark.parametrize("args_class", [TrainingArguments, GoatTrainingArguments], ids=["plain", "goat"])
def test_router_defaults_to_the_learning_rate_and_no_decay(make_model, tmp_path, args_class):
    model = make_model()
    args = cpu_args(tmp_path, args_class, learning_rate=2e-4, weight_decay=0.1)
    trainer = GoatTrainer(model=model, args=args, train_dataset=lm_dataset(), goat_config=SMALL)
    groups = groups_by_name(trainer, model)
    assert list(groups) == ["experts", "router"]  # lm_head is not a task head: frozen, in no group
    assert groups["experts"][1:] == (2e-4, 0.1)
    assert groups["router"][1:] == (2e-4, 0.0)


def test_router_weight_decay_is_honoured(make_model, tmp_path):
    model = make_model()
    args = cpu_args(tmp_path, GoatTrainingArguments, weight_decay=0.1, router_weight_decay=0.05)
    trainer = GoatTrainer(model=model, args=args, train_dataset=lm_dataset(), goat_config=SMALL)
    assert groups_by_name(trainer, model)["router"][2] == 0.05


def test_optimizer_cls_and_kwargs_is_honoured_with_the_goat_groups(make_model, tmp_path):
    model = make_model()
    args = cpu_args(tmp_path, GoatTrainingArguments, learning_rate=1e-3, router_learning_rate=5e-3)
    trainer = GoatTrainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(),
        goat_config=SMALL,
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    assert [(g["name"], g["lr"], g["momentum"]) for g in optimizer.param_groups] == [
        ("experts", 1e-3, 0.9),
        ("router", 5e-3, 0.9),
    ]


# ---- 7. checkpoints ----


def assert_adapter_folder(folder: Path, model) -> dict[str, torch.Tensor]:
    """The folder holds goat_config.json and goat_adapter.safetensors, no full weights, no base tensors."""
    files = set(os.listdir(folder))
    assert {CONFIG_NAME, WEIGHTS_NAME} <= files
    assert not files & set(FULL_WEIGHT_FILES)
    tensors = load_file(folder / WEIGHTS_NAME)
    heads = tuple(f"{head}." for head in model.goat_state.modules_to_save)
    adapter_suffixes = tuple(f".{name}" for name in LAYER_TENSORS + RESIDUAL_TENSORS)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for key in tensors:
        assert key.endswith(adapter_suffixes) or key.startswith(heads), key
        assert key not in frozen, key
    return tensors


def test_checkpoint_holds_the_adapter_only(make_model, tmp_path):
    model = make_model("bert-cls")
    args = cpu_args(tmp_path, save_strategy="steps", save_steps=2)
    trainer = GoatTrainer(model=model, args=args, train_dataset=classification_dataset(), goat_config=SMALL)
    trainer.train()

    tensors = assert_adapter_folder(tmp_path / "checkpoint-2", model)
    assert "classifier.weight" in tensors and "bert.embeddings.word_embeddings.weight" not in tensors
    live = adapter_copy(model)
    assert tensors.keys() == live.keys()
    assert all(torch.equal(tensors[name], live[name]) for name in live)
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        os.listdir(tmp_path / "checkpoint-2")
    )


def test_resuming_from_a_checkpoint_ends_bit_identical_to_an_uninterrupted_run(make_model, tmp_path):
    config = GoatConfig(r=8, num_experts=4, top_k=2, lora_dropout=0.1)  # dropout: the RNG state must resume too
    dataset = lm_dataset(num_examples=6)  # 3 steps per epoch: the run crosses an epoch boundary after resuming

    def run(output_dir: Path, resume: Path | None = None) -> dict[str, torch.Tensor]:
        model = make_model()
        args = cpu_args(
            output_dir, max_steps=5, save_strategy="steps", save_steps=2, learning_rate=1e-2, warmup_steps=1
        )
        trainer = GoatTrainer(model=model, args=args, train_dataset=dataset, goat_config=config)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        assert trainer.state.global_step == 5
        return adapter_copy(model)

    uninterrupted = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=tmp_path / "full" / "checkpoint-2")

    assert uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)
    assert not os.path.exists(tmp_path / "resumed" / "checkpoint-2")  # it started from step 2, not from scratch


def test_load_best_model_at_end_restores_the_best_adapter(make_model, tmp_path):
    scores = iter([0.1, 0.9, 0.3, 0.2])  # the metric we control: checkpoint-2 is the best, checkpoint-4 the last
    model = make_model()
    args = cpu_args(
        tmp_path,
        max_steps=4,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
    )
    trainer = GoatTrainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(),
        eval_dataset=lm_dataset(2, seed=5),
        compute_metrics=lambda prediction: {"score": next(scores)},
        goat_config=SMALL,
    )
    trainer.train()

    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    best = load_file(tmp_path / "checkpoint-2" / WEIGHTS_NAME)
    last = load_file(tmp_path / "checkpoint-4" / WEIGHTS_NAME)
    live = adapter_copy(model)
    assert all(torch.equal(live[name], best[name]) for name in live)
    assert any(not torch.equal(best[name], last[name]) for name in best)


def test_save_model_writes_an_adapter_folder_with_a_model_card(make_model, tmp_path):
    model = make_model()
    trainer = GoatTrainer(model=model, args=cpu_args(tmp_path / "run"), train_dataset=lm_dataset(), goat_config=SMALL)
    trainer.train()
    folder = tmp_path / "adapter"

    trainer.save_model(str(folder))

    assert_adapter_folder(folder, model)
    assert "GOAT" in (folder / "README.md").read_text()
    fresh = load_goat_adapter(make_model(), folder)
    reloaded, live = adapter_copy(fresh), adapter_copy(model)
    assert all(torch.equal(reloaded[name], live[name]) for name in live)


# ---- 8. activation checkpointing ----


@pytest.mark.parametrize("spelling", ["gradient_checkpointing", "activation_checkpointing"])
def test_reentrant_activation_checkpointing_with_aux_loss_is_refused(make_model, tmp_path, spelling):
    args = cpu_args(tmp_path, **{spelling: True, f"{spelling}_kwargs": {"use_reentrant": True}})
    refused = make_model()
    with pytest.raises(ValueError, match="use_reentrant"):
        GoatTrainer(model=refused, args=args, train_dataset=lm_dataset(), goat_config=SMALL)
    assert not goat_layers(refused)  # refused before injecting: the model is left as it was
    GoatTrainer(
        model=make_model(),
        args=args,
        train_dataset=lm_dataset(),  # no aux loss: nothing to lose
        goat_config=GoatConfig(r=8, num_experts=4, aux_loss_coef=0.0),
    )


def test_reentrant_checkpointing_enabled_on_the_model_warns_that_the_aux_gradient_is_lost(make_model, tmp_path, caplog):
    model = make_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = GoatTrainer(
        model=model, args=cpu_args(tmp_path, max_steps=2), train_dataset=lm_dataset(), goat_config=SMALL
    )
    with caplog.at_level(logging.WARNING, logger="goat_hf.trainer"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "no gradient path to the routers" in r.getMessage()]
    assert len(warnings) == 1 and "use_reentrant=False" in warnings[0]  # once, naming the fix


class RouterGradients(TrainerCallback):
    """Keeps each GOAT layer's router gradient just before the first optimizer step."""

    def __init__(self, model) -> None:
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = router_grads(self.model)


def first_router_grads(model, tmp_path, aux_loss_coef: float, **checkpointing) -> dict[str, torch.Tensor]:
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=aux_loss_coef)
    callback = RouterGradients(model)
    args = cpu_args(tmp_path, max_steps=1, max_grad_norm=0.0, **checkpointing)
    GoatTrainer(model=model, args=args, train_dataset=lm_dataset(), goat_config=config, callbacks=[callback]).train()
    return callback.grads


@pytest.mark.parametrize("kwargs", [{"use_reentrant": False}, None], ids=["non-reentrant", "default"])
def test_non_reentrant_checkpointing_keeps_the_aux_gradient(make_model, tmp_path, kwargs):
    checkpointing = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": kwargs}
    checkpointed = first_router_grads(make_model(), tmp_path / "ckpt", 0.1, **checkpointing)
    plain = first_router_grads(make_model(), tmp_path / "plain", 0.1)
    no_aux = first_router_grads(make_model(), tmp_path / "no_aux", 0.0, **checkpointing)

    assert max_difference(checkpointed, plain) < 1e-6
    assert max_difference(checkpointed, no_aux) > 1e-4


# ---- 9. DDP ----


@pytest.mark.slow
def test_ddp_two_processes_train_identical_adapters(tmp_path):
    torchrun(TESTS / "ddp_worker.py", tmp_path)

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    adapters = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert [report["world_size"] for report in reports] == [2, 2]
    assert reports[0]["shard"] != reports[1]["shard"]  # each rank trained on other data: the identity is DDP's doing
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][name], adapters[1][name]) for name in adapters[0])
    moved = set(reports[0]["moved"])
    assert {name for name in adapters[0] if name.endswith((".expert_A", ".expert_B", ".router.weight"))} == moved
    assert all(set(HEALTH_KEYS) <= entry.keys() for entry in reports[0]["log_history"] if "loss" in entry)


# ---- 11. TRL ----


def word_tokenizer():
    """A 100-word whitespace tokenizer (ids match the tiny models' vocabulary), built locally: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, 100)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def prompt_completion_dataset(num_examples: int = 8):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)

    def words(low: int, high: int) -> str:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return " ".join(f"w{i}" for i in torch.randint(4, 100, (length,), generator=generator).tolist())

    return Dataset.from_list([{"prompt": words(3, 6), "completion": " " + words(2, 5)} for _ in range(num_examples)])


def test_sft_trainer_trains_completion_only_logs_aux_and_saves_the_adapter(make_model, tmp_path):
    from trl import SFTConfig

    from goat_hf import GoatSFTTrainer

    tokenizer, dataset, model = word_tokenizer(), prompt_completion_dataset(), make_model()
    args = cpu_args(tmp_path / "run", SFTConfig, save_strategy="steps", save_steps=2)
    trainer = GoatSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, goat_config=SMALL
    )

    prompt_lengths = {}
    for example, row in zip(dataset, trainer.train_dataset, strict=True):
        prompt_length = len(tokenizer(example["prompt"])["input_ids"])
        completion = tokenizer(example["completion"])["input_ids"] + [tokenizer.eos_token_id]
        assert row["input_ids"][prompt_length:] == completion
        assert row["labels"] == [-100] * prompt_length + completion
        prompt_lengths[tuple(row["input_ids"])] = prompt_length
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        real = int(mask.sum())
        prompt_length = prompt_lengths[tuple(ids[:real].tolist())]
        assert (labels[:prompt_length] == -100).all() and (labels[real:] == -100).all()
        assert torch.equal(labels[prompt_length:real], ids[prompt_length:real])

    trainer.train()

    logs = training_logs(trainer)
    assert logs and all(set(HEALTH_KEYS) <= entry.keys() and entry["aux_loss"] > 0 for entry in logs)
    assert_adapter_folder(tmp_path / "run" / "checkpoint-2", model)
    trainer.save_model(str(tmp_path / "adapter"))
    assert_adapter_folder(tmp_path / "adapter", model)
    assert (tmp_path / "adapter" / "README.md").is_file()


def test_sft_trainer_loads_a_model_path_and_injects_before_wrapping(make_model, tmp_path):
    from trl import SFTConfig

    from goat_hf import GoatSFTTrainer

    make_model().save_pretrained(tmp_path / "base")
    args = cpu_args(tmp_path / "run", SFTConfig, max_steps=1, bf16=False)
    trainer = GoatSFTTrainer(
        model=str(tmp_path / "base"),
        args=args,
        train_dataset=prompt_completion_dataset(4),
        processing_class=word_tokenizer(),
        goat_config=SMALL,
    )
    assert isinstance(trainer.model, LlamaForCausalLM) and trainer.model.goat_state.config == SMALL
    trainer.train()
    assert "aux_loss" in training_logs(trainer)[0]


def test_sft_accumulation_weights_micro_batches_by_their_completion_tokens(make_model, tmp_path):
    from trl import SFTConfig

    from goat_hf import GoatSFTTrainer

    tokenizer, dataset = word_tokenizer(), prompt_completion_dataset(4)
    completion_tokens = [len(tokenizer(row["completion"])["input_ids"]) for row in dataset]
    assert sum(completion_tokens[:2]) != sum(completion_tokens[2:])  # a mean of micro-batch means would differ
    config = GoatConfig(r=8, num_experts=4, top_k=2, aux_loss_coef=0.0)

    def step(output_dir: Path, micro_batch: int, accumulation: int) -> dict[str, torch.Tensor]:
        model = make_model()
        args = sgd_args(output_dir, micro_batch, accumulation, args_class=SFTConfig, bf16=False)
        GoatSFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, goat_config=config
        ).train()
        return adapter_copy(model)

    accumulated = step(tmp_path / "ga", micro_batch=2, accumulation=2)
    big_batch = step(tmp_path / "big", micro_batch=4, accumulation=1)
    assert max_difference(accumulated, big_batch) < 1e-5


# ---- settings that cannot be honoured are said, not dropped ----


def test_goat_flags_for_an_already_injected_model_are_reported_not_silently_dropped(make_model, tmp_path, caplog):
    model = get_goat_model(make_model(), SMALL)
    args = cpu_args(tmp_path, args_class=GoatTrainingArguments, aux_loss_coef=0.5)
    with caplog.at_level(logging.WARNING, logger="goat_hf.trainer"):
        trainer = GoatTrainer(model=model, args=args, train_dataset=lm_dataset())
    assert trainer.aux_loss_coef == SMALL.aux_loss_coef
    assert any("already has GOAT layers" in r.getMessage() for r in caplog.records)


def test_resuming_with_another_goat_config_is_refused(make_model, tmp_path):
    trainer = GoatTrainer(
        model=make_model(), args=cpu_args(tmp_path, save_strategy="steps", save_steps=1, max_steps=1),
        train_dataset=lm_dataset(), goat_config=SMALL,
    )
    trainer.train()
    other = GoatConfig(**{**SMALL.to_dict(), "eta": SMALL.eta * 2})
    resumed = GoatTrainer(
        model=make_model(), args=cpu_args(tmp_path, max_steps=2), train_dataset=lm_dataset(), goat_config=other
    )
    with pytest.raises(ValueError, match="another GoatConfig"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
