"""examples/run_image_classification.py end to end on tiny generated image folders (no downloads): the offline ViT
default, a CLIP checkpoint with a new head, adapter reloading, and the head kept out of GOAT and trained in full."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from PIL import Image
from trainer_fixtures import single_thread
from transformers import CLIPConfig, CLIPForImageClassification, CLIPImageProcessorPil, CLIPModel

from goat_hf import (
    GoatConfig,
    GoatLinear,
    GoatTrainingArguments,
    get_goat_model,
    goat_layers,
    load_goat_adapter,
    load_goat_model,
)

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "run_image_classification.py"
CLASSES = ["checkerboard", "diagonal", "horizontal", "vertical"]  # as the image folder sorts them
QUICK = ["--max_steps", "3", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
         "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip
LEARN = ["--max_steps", "50", "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "100",
         "--logging_steps", "10", "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("run_image_classification", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def tiny_clip(seed: int = 0) -> CLIPModel:
    """A CLIP model (both towers, as a CLIP checkpoint has them) whose vision tower takes 32x32 images."""
    config = CLIPConfig(
        text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(seed)
    return CLIPModel(config)


def pixel_batch(script, count: int = 8) -> torch.Tensor:
    rng = np.random.default_rng(5)
    images = [script.synthetic_image(rng, i % 4) for i in range(count)]
    return script.demo_image_processor()(images, return_tensors="pt")["pixel_values"]


def test_offline_default_trains_saves_and_reloads(script, tmp_path, capsys):
    out, data = tmp_path / "out", tmp_path / "data"
    argv = ["--output_dir", str(out), "--synthetic_data_dir", str(data), "--synthetic_train_samples", "400"]
    # 4 epochs of 400 images: enough to learn the stripes (0.73 on this machine) in about 20 s on one thread
    trainer, metrics = script.run([*argv, "--cache_dir", str(tmp_path / "cache"), *LEARN])
    assert "Validation accuracy:" in capsys.readouterr().out
    # the real imagefolder path: PNG files in class subfolders of train/ and validation/
    assert sorted(p.name for p in (data / "train").iterdir()) == CLASSES
    assert len(list((data / "train").glob("*/*.png"))) == 400 and metrics["eval_samples"] == 100
    held_out = [len(list((data / "validation" / name).glob("*.png"))) for name in CLASSES]
    assert sum(held_out) == 100
    # Beats chance: a model that guesses, or always answers one class, scores about the majority rate; require
    # more than four standard deviations of a guesser's accuracy above it (0.42 here).
    chance = max(held_out) / sum(held_out)
    assert chance == 0.25
    assert metrics["eval_accuracy"] > chance + 4 * math.sqrt(chance * (1 - chance) / sum(held_out))
    for name in ("goat_config.json", "goat_adapter.safetensors", "README.md", "preprocessor_config.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "goat_config.json").read_text())
    assert meta["modules_to_save"] == ["classifier"]
    assert meta["layers"] and all(name.startswith("vit.") for name in meta["layers"])
    assert meta["config"] == GoatConfig().to_dict()  # the paper's defaults: r=8, 8 experts, top-2, "goat" scaling

    trained = trainer.model.eval()
    fresh = script.demo_vit(CLASSES, trainer.args.seed)
    assert not torch.equal(trained.classifier.weight, fresh.classifier.weight)  # the head was trained in full
    pixels = pixel_batch(script)
    with torch.no_grad():
        expected = trained(pixel_values=pixels).logits
        onto_fresh = load_goat_adapter(fresh, out).eval()(pixel_values=pixels).logits
        from_folder = load_goat_model(out, base_model=out / "base_model").eval()(pixel_values=pixels).logits
    assert torch.equal(onto_fresh, expected)
    assert torch.equal(from_folder, expected)


def test_clip_checkpoint_gets_a_new_head_and_a_held_out_split(script, tmp_path):
    checkpoint = tmp_path / "tiny-clip"
    tiny_clip().save_pretrained(checkpoint)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(checkpoint)
    images = tmp_path / "images"  # class subfolders only: 15% of them are held out for validation
    rng = np.random.default_rng(0)
    for i in range(40):
        (images / CLASSES[i % 4]).mkdir(parents=True, exist_ok=True)
        image = script.synthetic_image(rng, script.SYNTHETIC_CLASSES.index(CLASSES[i % 4]), size=48)
        image.save(images / CLASSES[i % 4] / f"{i}.png")
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(checkpoint), "--data_dir", str(images), "--output_dir", str(out)]
    trainer, metrics = script.run([*argv, "--cache_dir", str(tmp_path / "cache"), *QUICK])
    assert metrics["eval_samples"] == 6 and len(trainer.train_dataset) == 34
    assert isinstance(trainer.model, CLIPForImageClassification)
    meta = json.loads((out / "goat_config.json").read_text())
    assert meta["modules_to_save"] == ["classifier"]
    assert meta["layers"] and all(name.startswith("vision_model.") for name in meta["layers"])
    assert trainer.model.config.id2label == dict(enumerate(CLASSES))


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_goat_adapts_the_vision_tower_and_trains_the_head_in_full(script, kind, tmp_path):
    if kind == "vit":
        model, tower = script.demo_vit(CLASSES), "vit."
    else:
        model, tower = CLIPForImageClassification(tiny_clip().config), "vision_model."
    # what GoatTrainer injects with the script's default flags
    get_goat_model(model, GoatTrainingArguments(output_dir=str(tmp_path)).to_goat_config())
    layers = goat_layers(model)
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    plain = {name for name in linears if not name.endswith((".base_layer", ".router"))}
    assert plain == {"classifier"}  # every other Linear is the frozen W0 or the router inside a GoatLinear
    assert layers and all(name.startswith(tower) for name in layers)
    assert not any(isinstance(m, GoatLinear) for m in model.classifier.modules())
    assert isinstance(model.classifier, torch.nn.Linear)
    assert all(p.requires_grad for p in model.classifier.parameters())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"} | {
        f"{layer}.{tensor}" for layer in layers for tensor in ("expert_A", "expert_B", "router.weight")
    }


def test_random_resized_crop_gives_the_model_size_and_follows_the_torch_seed(script):
    image = Image.linear_gradient("L").convert("RGB").resize((50, 40))
    crops = {}
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        crops.setdefault(seed, []).append([script.random_resized_crop(image, (32, 24), 0.08) for _ in range(4)])
    assert all(crop.size == (24, 32) for crop in crops[4][0])  # (height, width) in, PIL's (width, height) out
    assert [c.tobytes() for c in crops[3][0]] == [c.tobytes() for c in crops[3][1]]
    assert [c.tobytes() for c in crops[3][0]] != [c.tobytes() for c in crops[4][0]]


def test_synthetic_folder_is_reused_and_never_written_over_foreign_files(script, tmp_path):
    folder = script.write_synthetic_image_folder(tmp_path / "data", train_samples=8, seed=1)
    first = (folder / "train" / "checkerboard" / "00003.png").read_bytes()
    stamp = (folder / "synthetic.json").stat().st_mtime_ns
    script.write_synthetic_image_folder(folder, train_samples=8, seed=1)
    assert (folder / "synthetic.json").stat().st_mtime_ns == stamp
    script.write_synthetic_image_folder(folder, train_samples=8, seed=2)  # other settings: rewritten
    assert (folder / "train" / "checkerboard" / "00003.png").read_bytes() != first
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.png").touch()
    with pytest.raises(ValueError, match="holds files this script did not write; pass an empty or new"):
        script.write_synthetic_image_folder(foreign)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--remove_unused_columns", "true"], "Pass --remove_unused_columns false"),
        (["--data_dir", "a", "--train_dir", "b"], "Pass one source of images, not --data_dir and --train_dir"),
        (["--train_val_split", "1.5"], r"train_val_split=1.5 must be in \(0, 1\)"),
        (["--min_crop_scale", "0"], r"min_crop_scale=0.0 must be in \(0, 1\]"),
    ],
    ids=["remove-unused-columns", "two-sources", "split", "crop-scale"],
)
def test_argument_errors_say_what_to_pass(script, argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        script.parse_arguments(["--output_dir", str(tmp_path), *argv])


def test_dataset_errors_name_the_columns_and_labels(script, tmp_path):
    raw = DatasetDict({"validation": Dataset.from_dict({"image": [0], "label": [1]})})
    with pytest.raises(ValueError, match=r"Column 'label' is .* not a ClassLabel; image classification needs class"):
        script.label_names(raw, "label")
    images = tmp_path / "images"
    for i in range(8):
        (images / CLASSES[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i, 0, 0)).save(images / CLASSES[i % 2] / f"{i}.png")
    argv = ["--output_dir", str(tmp_path), "--data_dir", str(images), "--image_column_name", "img"]
    model_args, data_args, _ = script.parse_arguments([*argv, "--cache_dir", str(tmp_path / "cache")])
    with pytest.raises(ValueError, match=r"no column 'img'; its columns are \['image', 'label'\]\. Name the right"):
        script.load_raw_datasets(data_args, model_args, seed=0)


@pytest.mark.parametrize(
    ("splits", "flag", "message"),
    [
        (["validation"], "--validation_dir", r"Training needs a 'train' split; the data has \['validation'\]\. Pass"),
        (["test"], "--data_dir", r"The data needs a 'train' or a 'validation' split; it has \['test'\]"),
    ],
    ids=["no-train", "neither"],
)
def test_missing_splits_are_named(script, tmp_path, splits, flag, message):
    for split in splits:
        for i in range(4):
            (tmp_path / "images" / split / CLASSES[i % 2]).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "images" / split / CLASSES[i % 2] / f"{i}.png")
    folder = tmp_path / "images" / splits[0] if flag == "--validation_dir" else tmp_path / "images"
    argv = ["--output_dir", str(tmp_path / "out"), flag, str(folder), "--cache_dir", str(tmp_path / "cache")]
    with pytest.raises(ValueError, match=message):
        script.run(argv)
