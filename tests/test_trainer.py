"""GoatTrainer: the one-line swap, settings that cannot be honoured, and the logged GOAT metrics."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import pytest
import torch
from conftest import perturb_
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trainer_fixtures import (
    HEALTH_KEYS,
    SMALL,
    cpu_args,
    lm_dataset,
    single_thread,
    training_logs,
)
from transformers import LlamaForCausalLM, TrainerCallback, TrainingArguments

from goat_hf import GoatConfig, GoatTrainer, GoatTrainingArguments, get_goat_model, goat_layers
from goat_hf.heatmap import render_load_heatmap

TESTS = Path(__file__).parent

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


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
        # aux_loss is the mean over the 14 layers of E·Σ f·P / k: the loss term is coef · k · layers · aux_loss
        assert entry["loss"] - entry["task_loss"] == pytest.approx(1e-3 * 2 * 14 * entry["aux_loss"], abs=2e-4)
    assert list(trainer.routing_loads) == list(layers)


# ---- settings that cannot be honoured are said, not dropped ----


def test_goat_flags_for_an_already_injected_model_are_reported_not_silently_dropped(make_model, tmp_path, caplog):
    model = get_goat_model(make_model(), SMALL)
    args = cpu_args(tmp_path, args_class=GoatTrainingArguments, aux_loss_coef=0.5)
    with caplog.at_level(logging.WARNING, logger="goat_hf.trainer"):
        trainer = GoatTrainer(model=model, args=args, train_dataset=lm_dataset())
    assert trainer.aux_loss_coef == SMALL.aux_loss_coef
    assert any("already has GOAT layers" in r.getMessage() for r in caplog.records)


# ---- the logged GOAT metrics: recomputed from the routing, and in the trackers ----


class RoutingByFormula(TrainerCallback):
    """At the first optimizer step (routers not yet updated): each layer's expert loads and balance loss / k,
    recomputed from the layer inputs captured by hooks and the router weights, by the formula alone."""

    def __init__(self, model) -> None:
        self.layers, self.inputs, self.loads, self.aux = goat_layers(model), {}, None, None
        for name, layer in self.layers.items():
            layer.register_forward_pre_hook(lambda m, args, name=name: self.inputs.__setitem__(name, args[0].detach()))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.loads is not None:
            return
        self.loads, self.aux = {}, {}
        for name, layer in self.layers.items():
            tokens = self.inputs[name].reshape(-1, layer.in_features).double()  # [T, n]
            probs = torch.softmax(tokens @ layer.router.weight.detach().double().T, dim=-1)  # [T, E]
            picks = torch.zeros_like(probs).scatter_(1, probs.topk(layer.top_k, dim=-1).indices, 1.0)
            f, P = picks.mean(0), probs.mean(0)
            self.loads[name] = (f / layer.top_k).tolist()
            self.aux[name] = (layer.num_experts * (f * P).sum() / layer.top_k).item()


def test_logged_routing_and_per_layer_aux_match_the_formula_on_uneven_routing(make_model, tmp_path):
    model = make_model()
    trainer = GoatTrainer(
        model=model, args=cpu_args(tmp_path, max_steps=1), train_dataset=lm_dataset(), goat_config=SMALL
    )
    perturb_(*(layer.router.weight for layer in goat_layers(model).values()), std=1.0)  # peaked, uneven routing
    formula = RoutingByFormula(model)
    trainer.add_callback(formula)
    trainer.train()

    (entry,) = training_logs(trainer)
    names = list(formula.loads)
    assert list(trainer.routing_loads) == list(trainer.routing_aux) == names
    for name in names:
        assert trainer.routing_loads[name] == pytest.approx(formula.loads[name], abs=1e-6)
        assert trainer.routing_aux[name] == pytest.approx(formula.aux[name], rel=1e-5)
    aux = list(formula.aux.values())
    assert max(aux) > 1.05  # uneven: balanced routing gives 1.0 in every layer
    assert entry["aux_loss"] == pytest.approx(sum(aux) / len(aux), abs=1e-4)
    loads = torch.tensor(list(formula.loads.values()))  # [L, E]
    entropy = -(loads * loads.clamp(min=1e-12).log()).sum(-1) / torch.log(torch.tensor(4.0))
    assert entry["router_load_min"] == pytest.approx(loads.min().item(), abs=1e-4)
    assert entry["router_load_max"] == pytest.approx(loads.max().item(), abs=1e-4)
    assert entry["router_load_entropy"] == pytest.approx(entropy.mean().item(), abs=1e-4)


def read_events(folder: Path) -> EventAccumulator:
    [events] = list(folder.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_gets_the_heatmap_and_per_layer_routing_at_each_evaluation(make_model, tmp_path):
    model = make_model()
    args = cpu_args(tmp_path, report_to=["tensorboard"], eval_strategy="steps", eval_steps=1, max_steps=2)
    trainer = GoatTrainer(
        model=model, args=args, train_dataset=lm_dataset(), eval_dataset=lm_dataset(4, seed=1), goat_config=SMALL
    )
    trainer.train()

    events = read_events(tmp_path)
    [first, last] = events.Images("train/goat_routing_heatmap")  # one picture per evaluation
    assert (first.step, last.step) == (1, 2)
    picture = Image.open(io.BytesIO(last.encoded_image_string)).convert("RGB")
    expected = render_load_heatmap(trainer.routing_loads)  # the loads logged at step 2
    assert picture.size == expected.size and list(picture.getdata()) == list(expected.getdata())
    for name, shares in trainer.routing_loads.items():
        for j, share in enumerate(shares):
            scalars = events.Scalars(f"train/goat_load/{name}/expert_{j}")
            assert [s.step for s in scalars] == [1, 2] and scalars[-1].value == pytest.approx(share, abs=1e-6)
        aux = events.Scalars(f"train/goat_aux/{name}")
        assert aux[-1].value == pytest.approx(trainer.routing_aux[name], rel=1e-6)
    assert len(trainer.routing_loads) == 14


def test_without_pillow_trackers_get_the_scalars_and_a_note(make_model, tmp_path, monkeypatch, caplog):
    args = cpu_args(tmp_path, report_to=["tensorboard"], eval_strategy="steps", eval_steps=1, max_steps=1)
    trainer = GoatTrainer(
        model=make_model(), args=args, train_dataset=lm_dataset(), eval_dataset=lm_dataset(4), goat_config=SMALL
    )
    monkeypatch.setitem(sys.modules, "PIL", None)  # after the datasets are built: datasets imports PIL when it can
    with caplog.at_level(logging.INFO, logger="goat_hf.routing_trackers"):
        trainer.train()
    events = read_events(tmp_path)
    assert "train/goat_routing_heatmap" not in events.Tags()["images"]
    assert len([tag for tag in events.Tags()["scalars"] if tag.startswith("train/goat_load/")]) == 14 * 4
    assert "needs Pillow" in caplog.text
