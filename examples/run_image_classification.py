"""Fine-tune a GOAT adapter for image classification: an image folder, a Hub dataset, or an offline synthetic task.

The offline default (30 to 60 seconds on 2 CPU cores, no network):

    python examples/run_image_classification.py

With no arguments it writes a seeded 4-class image folder (stripes: horizontal, vertical, diagonal, checkerboard,
with random colours, periods, phases and pixel noise) as PNG files in class subfolders under
outputs/synthetic-stripes, reads it with datasets' "imagefolder" builder, trains GOAT adapters on a small ViT
built from a config with random weights (32x32 images, 8x8 patches, hidden size 64, 4 layers) and prints the
validation accuracy: about 0.9, where chance is 0.25. No pretrained vision model ships in a package, so this
default checks the pipeline (image folder, transforms, GOAT injection, training, saving, reloading), not the
method's quality. It trains at lr 1e-3 for 6 epochs on one CPU thread (see `limit_threads_for_demo`); at the
paper's lr 1e-4 the random ViT reaches only about 0.6 in that time. The adapter and its model card go to
outputs/image-classification-demo and the random base beside them (in base_model/; goat_config.json records no
path for a local base), so `goat_hf.load_goat_model("outputs/image-classification-demo",
base_model="outputs/image-classification-demo/base_model")` reloads the trained classifier.

Your own images (an image folder: one subfolder per class, optionally inside train/ and validation/ split folders;
without a validation split, --train_val_split of the training images are held out). A checkpoint that already has
a head for other classes (google/vit-base-patch16-224, say) also needs --ignore_mismatched_sizes:

    python examples/run_image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --data_dir path/to/images --output_dir outputs/mine --learning_rate 1e-4

The paper's settings (Fan et al., ICML 2025: ViT-B/32, 8 experts, top-2, r=8, lr 1e-4, every linear layer of the
vision tower, the new head trained in full; AdamW, cosine schedule, 3% warmup, dropout 0.05), on CLIP's ViT-B/32
and a Hub dataset (needs network; the epochs and batch size below are an example, not the paper's):

    python examples/run_image_classification.py --model_name_or_path openai/clip-vit-base-patch32 \\
        --dataset_name uoft-cs/cifar10 --image_column_name img --output_dir outputs/cifar10 \\
        --goat_r 8 --goat_num_experts 8 --goat_top_k 2 --goat_lora_dropout 0.05 --learning_rate 1e-4 \\
        --lr_scheduler_type cosine --warmup_steps 0.03 --num_train_epochs 5 --per_device_train_batch_size 128 \\
        --eval_strategy epoch --save_strategy epoch

A CLIP checkpoint becomes CLIPForImageClassification: CLIP's vision tower (no text tower, no projection) with a
new linear head on the mean of the patch tokens. GOAT adapts every nn.Linear of the vision tower
(`--goat_target_modules all-linear`); the head, `classifier`, is found automatically, gets no GOAT layer and is
trained in full and saved with the adapter. Scaling: the default `--goat_scaling goat` is the paper's derived
s = sqrt(3·n·η/d), the library default. The paper's α=16 only enters with `--goat_scaling alpha --goat_lora_alpha 16`
(s = α/d, what the reference scripts run); without `--goat_scaling alpha` (or rslora) `--goat_lora_alpha` has no
effect.

The same shape as transformers' examples/pytorch/image-classification/run_image_classification.py, with these
differences: GoatTrainer and GoatTrainingArguments (every `--goat_*` flag, `--aux_loss_coef`,
`--router_learning_rate`); no torchvision: the training augmentation (torchvision's RandomResizedCrop algorithm and a
horizontal flip, `--augment false` to switch it off) is done with Pillow, and the image processor does the rest
(resize, centre crop, rescale, normalise), for evaluation too; `--remove_unused_columns` defaults to false (the
image column is transformed on the fly); the model defaults to the offline tiny ViT and the training defaults below
are sized for the demo (pass the flags above for real runs); with none of `--do_train/--do_eval` the script trains
and evaluates; the adapter and its model card are saved after evaluation, so the card carries the final metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from datasets import ClassLabel, DatasetDict, load_dataset
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    default_data_collator,
    set_seed,
)

from goat_hf import GoatTrainer, GoatTrainingArguments, write_model_card
from goat_hf.tasks.glue_metrics import make_compute_metrics

logger = logging.getLogger(__name__)

SYNTHETIC_TASK = "synthetic_stripes"
SYNTHETIC_IMAGE_SIZE = 32
BASE_MODEL_FOLDER = "base_model"  # where the offline demo saves its random base, inside --output_dir
# Training defaults sized for the offline demo; every one can be overridden on the command line.
DEMO_DEFAULTS = {
    "output_dir": "outputs/image-classification-demo",
    "learning_rate": 1e-3,
    "num_train_epochs": 6.0,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "warmup_steps": 0.03,
    "lr_scheduler_type": "cosine",
    "logging_steps": 25,
    "remove_unused_columns": False,
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Vision model folder or Hub id (ViT, CLIP, ... any AutoModelForImageClassification); None = a "
            "small ViT with random weights built from a config (offline; checks the pipeline only)."
        },
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor folder or Hub id; None = the model's own."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are stored."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise a classification head whose number of labels differs."}
    )
    license: str | None = field(
        default=None, metadata={"help": "License of the adapter, for its model card (the base model's, usually)."}
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id (needs network), e.g. uoft-cs/cifar10."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of the Hub dataset."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "An image folder: one subfolder per class, optionally inside train/ and validation/ split "
            "folders (read with datasets' imagefolder builder)."
        },
    )
    train_dir: str | None = field(default=None, metadata={"help": "An image folder with the training images."})
    validation_dir: str | None = field(default=None, metadata={"help": "An image folder with the validation images."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Share of the training images held out when there is no validation split."}
    )
    image_column_name: str = field(default="image", metadata={"help": "The dataset column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The dataset column holding the labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation images."})
    augment: bool = field(
        default=True,
        metadata={"help": "Random resized crop (torchvision's algorithm) and horizontal flip of training images."},
    )
    min_crop_scale: float = field(
        default=0.08, metadata={"help": "Smallest area share of a random crop (torchvision's default, 0.08)."}
    )
    synthetic_data_dir: str = field(
        default="outputs/synthetic-stripes",
        metadata={"help": "Where the synthetic image folder is written (no dataset_name, data_dir or train_dir)."},
    )
    synthetic_train_samples: int = field(
        default=2000, metadata={"help": "Training images of the synthetic task; a quarter as many validate."}
    )

    def __post_init__(self) -> None:
        sources = [
            flag
            for flag, value in (
                ("--dataset_name", self.dataset_name),
                ("--data_dir", self.data_dir),
                ("--train_dir/--validation_dir", self.train_dir or self.validation_dir),
            )
            if value
        ]
        if len(sources) > 1:
            raise ValueError(f"Pass one source of images, not {' and '.join(sources)}.")
        if not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"train_val_split={self.train_val_split} must be in (0, 1), e.g. 0.15.")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"min_crop_scale={self.min_crop_scale} must be in (0, 1], e.g. 0.08.")

    @property
    def name(self) -> str:
        """The task's name in logs and the model card."""
        if self.dataset_name is not None:
            return self.dataset_name
        return "imagefolder" if self.data_dir or self.train_dir or self.validation_dir else SYNTHETIC_TASK


# ---- the offline synthetic task ----

SYNTHETIC_CLASSES = ("horizontal", "vertical", "diagonal", "checkerboard")


def synthetic_image(rng: np.random.Generator, label: int, size: int = SYNTHETIC_IMAGE_SIZE) -> Image.Image:
    """One image of class `label`: a stripe pattern of period 4 to 10 pixels at a random phase, in two random colours
    at least 100 apart in brightness, plus Gaussian pixel noise (std 24). A horizontal flip keeps every class."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    k = 2 * np.pi / rng.uniform(4.0, 10.0)  # wave number
    phase = rng.uniform(0, 2 * np.pi, size=2)
    name = SYNTHETIC_CLASSES[label]
    if name == "horizontal":
        wave = np.sin(k * y + phase[0])
    elif name == "vertical":
        wave = np.sin(k * x + phase[0])
    elif name == "diagonal":  # either direction: a flip turns one into the other
        wave = np.sin(k * (x + rng.choice([-1, 1]) * y) / math.sqrt(2) + phase[0])
    else:  # checkerboard
        wave = np.sin(k * x + phase[0]) * np.sin(k * y + phase[1])
    colours = rng.uniform(0, 255, size=(2, 3))
    while abs(colours[0].mean() - colours[1].mean()) < 100:
        colours = rng.uniform(0, 255, size=(2, 3))
    pixels = np.where((wave > 0)[..., None], colours[0], colours[1]) + rng.normal(0, 24, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_synthetic_image_folder(folder: str | os.PathLike, train_samples: int = 2000, seed: int = 0) -> Path:
    """Write train/<class>/*.png and validation/<class>/*.png (a quarter as many), classes balanced; returns `folder`.

    A folder written earlier with the same settings (recorded in synthetic.json) is reused as it is.
    """
    folder = Path(folder)
    manifest = {"classes": list(SYNTHETIC_CLASSES), "train_samples": train_samples, "seed": seed,
                "image_size": SYNTHETIC_IMAGE_SIZE}  # fmt: skip
    manifest_path = folder / "synthetic.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        return folder
    if folder.is_dir() and any(folder.iterdir()) and not manifest_path.is_file():
        raise ValueError(f"{folder} holds files this script did not write; pass an empty or new --synthetic_data_dir.")
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_samples), ("validation", max(train_samples // 4, len(SYNTHETIC_CLASSES)))):
        shutil.rmtree(folder / split, ignore_errors=True)  # a folder written with other settings
        for name in SYNTHETIC_CLASSES:
            (folder / split / name).mkdir(parents=True)
        for i in range(count):
            label = i % len(SYNTHETIC_CLASSES)
            synthetic_image(rng, label).save(folder / split / SYNTHETIC_CLASSES[label] / f"{i:05d}.png")
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


# ---- data ----


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> DatasetDict:
    """The images as a DatasetDict with "train" and "validation" splits (validation split off train if missing)."""
    cache = {"cache_dir": model_args.cache_dir}
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, **cache)
    elif data_args.train_dir or data_args.validation_dir:
        data_files = {split: os.path.join(folder, "**") for split, folder in
                      (("train", data_args.train_dir), ("validation", data_args.validation_dir)) if folder}  # fmt: skip
        raw = load_dataset("imagefolder", data_files=data_files, **cache)
    else:
        data_dir = data_args.data_dir
        if data_dir is None:
            logger.info("No dataset_name, data_dir or train_dir: writing the synthetic stripes image folder.")
            data_dir = write_synthetic_image_folder(
                data_args.synthetic_data_dir, data_args.synthetic_train_samples, seed
            )
        raw = load_dataset("imagefolder", data_dir=str(data_dir), **cache)
    if "validation" not in raw and "train" in raw:
        held_out = raw["train"].train_test_split(data_args.train_val_split, seed=seed)
        raw["train"], raw["validation"] = held_out["train"], held_out["test"]
    if "validation" not in raw:
        raise ValueError(f"The data needs a 'train' or a 'validation' split; it has {list(raw)}.")
    columns = raw["validation"].column_names
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in columns:
            raise ValueError(f"The dataset has no column {column!r}; its columns are {columns}. Name the right one "
                             "with --image_column_name / --label_column_name.")  # fmt: skip
    return raw


def label_names(raw: DatasetDict, label_column: str) -> list[str]:
    feature = raw["validation"].features[label_column]
    if not isinstance(feature, ClassLabel):
        raise ValueError(f"Column {label_column!r} is {feature}, not a ClassLabel; image classification needs "
                         "class labels (an image folder gives them from its subfolder names).")  # fmt: skip
    return list(feature.names)


def input_size(processor) -> tuple[int, int]:
    """(height, width) of the images `processor` hands to the model."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    if size.height is not None:
        return size.height, size.width
    return size.shortest_edge, size.shortest_edge


def random_resized_crop(image: Image.Image, size: tuple[int, int], min_scale: float) -> Image.Image:
    """torchvision's RandomResizedCrop (area share in [min_scale, 1], aspect ratio in [3/4, 4/3], ten tries),
    drawn from torch's generator so that Trainer's seed and dataloader workers behave as with torchvision.

    When no try fits, the whole image is used (torchvision takes a centre crop clipped to the ratio range).
    """
    width, height = image.size
    for _ in range(10):
        area = width * height * torch.empty(1).uniform_(min_scale, 1.0).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3)).item())
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = torch.randint(0, width - w + 1, (1,)).item()
            top = torch.randint(0, height - h + 1, (1,)).item()
            return image.resize(size[::-1], Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    return image.resize(size[::-1], Image.Resampling.BILINEAR)


def make_transform(processor, data_args: DataTrainingArguments, augment: bool):
    """Batch transform: images (optionally augmented) -> the processor's pixel_values, labels -> labels."""
    size = input_size(processor)

    def transform(batch: dict) -> dict:
        images = [image.convert("RGB") for image in batch[data_args.image_column_name]]
        if augment:
            images = [random_resized_crop(image, size, data_args.min_crop_scale) for image in images]
            images = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if torch.rand(1).item() < 0.5 else image
                      for image in images]  # fmt: skip
        pixel_values = processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": batch[data_args.label_column_name]}

    return transform


def prepare_split(raw: DatasetDict, name: str, limit: int | None, transform, seed: int) -> datasets.Dataset:
    """The split, cut to a random `limit` images when given, transformed on the fly."""
    dataset = raw[name]
    if limit is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(limit, len(dataset))))
    dataset.set_transform(transform)
    return dataset


# ---- model ----


def demo_vit(labels: list[str], seed: int = 0) -> ViTForImageClassification:
    """The offline default: a small ViT (32x32 images, 8x8 patches, hidden 64, 4 layers) with weights from `seed`."""
    config = ViTConfig(
        image_size=SYNTHETIC_IMAGE_SIZE, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, num_labels=len(labels), label2id={name: i for i, name in enumerate(labels)},
        id2label=dict(enumerate(labels)),
    )  # fmt: skip
    torch.manual_seed(seed)
    return ViTForImageClassification(config)


def demo_image_processor() -> ViTImageProcessorPil:
    return ViTImageProcessorPil(size={"height": SYNTHETIC_IMAGE_SIZE, "width": SYNTHETIC_IMAGE_SIZE},
                                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])  # fmt: skip


def limit_threads_for_demo(model_args: ModelArguments) -> None:
    """One CPU thread for the offline ViT, unless OMP_NUM_THREADS says otherwise.

    Its matrices (about 1k x 64 by 64 x 64) are too small for a second thread to help, and on a 2-core machine busy
    with other work two threads waiting for each other made the default run 10 times slower (8.7 minutes, not 55 s).
    """
    if model_args.model_name_or_path is None and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
        logger.info("The demo ViT trains on one CPU thread; set OMP_NUM_THREADS to choose another number.")


def load_model(model_args: ModelArguments, labels: list[str], training_args: GoatTrainingArguments):
    """(model, image processor). The offline ViT is saved into <output_dir>/base_model, the folder to pass as
    load_goat_model(output_dir, base_model=...)."""
    if model_args.model_name_or_path is None:
        model, processor = demo_vit(labels, training_args.seed), demo_image_processor()
        if training_args.do_train and training_args.should_save:
            folder = Path(training_args.output_dir, BASE_MODEL_FOLDER).resolve()
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
        return model, processor
    path = model_args.model_name_or_path
    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
    config = AutoConfig.from_pretrained(
        path, num_labels=len(labels), label2id={name: i for i, name in enumerate(labels)},
        id2label=dict(enumerate(labels)), finetuning_task="image-classification", **hub,
    )  # fmt: skip
    model = AutoModelForImageClassification.from_pretrained(
        path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub
    )
    processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name or path, **hub)
    return model, processor


# ---- train and evaluate ----


def parse_arguments(argv: list[str] | None) -> tuple[ModelArguments, DataTrainingArguments, GoatTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, GoatTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        parser.set_defaults(**DEMO_DEFAULTS)
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.remove_unused_columns:
        raise ValueError("Pass --remove_unused_columns false: the images are turned into pixel_values on the fly, "
                         "so Trainer must keep the image column.")  # fmt: skip
    if not (training_args.do_train or training_args.do_eval):
        training_args.do_train = training_args.do_eval = True
    return model_args, data_args, training_args


def setup_logging(training_args: GoatTrainingArguments) -> None:
    """This script and goat_hf log at INFO; transformers and datasets at --log_level (warnings by default)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    datasets.utils.logging.set_verbosity(training_args.get_process_log_level())
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def save_adapter(trainer: GoatTrainer, model_args: ModelArguments, data_args: DataTrainingArguments) -> None:
    """Save the adapter (goat_config.json, goat_adapter.safetensors), the image processor and the model card."""
    trainer.save_model()
    if not trainer.is_world_process_zero():
        return
    folder = Path(trainer.args.output_dir)
    if data_args.dataset_name is not None:  # a Hub dataset id: the Hub lists the results under it
        dataset = data_args.dataset_name
    elif data_args.name == SYNTHETIC_TASK:
        dataset = f"{SYNTHETIC_TASK}: images generated by examples/run_image_classification.py (seeded)"
    else:
        dataset = f"local image folder ({data_args.data_dir or data_args.train_dir or data_args.validation_dir})"
    card = write_model_card(trainer.model, folder, trainer, dataset_name=dataset, license=model_args.license)
    print(f"Adapter written to {folder / 'goat_config.json'} and {folder / 'goat_adapter.safetensors'}")
    print(f"Model card written to {card}")


def run(argv: list[str] | None = None) -> tuple[GoatTrainer, dict[str, float]]:
    """Run the example; returns the trainer (its model carries the trained adapter) and the evaluation metrics."""
    model_args, data_args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    logger.info("Task %s; output folder %s; train %s, evaluate %s.", data_args.name, training_args.output_dir,
                training_args.do_train, training_args.do_eval)  # fmt: skip
    set_seed(training_args.seed)
    limit_threads_for_demo(model_args)

    with training_args.main_process_first(desc="image folder"):
        raw = load_raw_datasets(data_args, model_args, training_args.seed)
    do_train, do_eval = training_args.do_train, training_args.do_eval
    if do_train and "train" not in raw:
        raise ValueError(f"Training needs a 'train' split; the data has {list(raw)}. Pass --do_eval alone to evaluate.")
    labels = label_names(raw, data_args.label_column_name)
    model, processor = load_model(model_args, labels, training_args)
    train_dataset = eval_dataset = None
    if do_train:
        transform = make_transform(processor, data_args, augment=data_args.augment)
        train_dataset = prepare_split(raw, "train", data_args.max_train_samples, transform, training_args.seed)
    if do_eval:
        transform = make_transform(processor, data_args, augment=False)
        eval_dataset = prepare_split(raw, "validation", data_args.max_eval_samples, transform, training_args.seed)
    trainer = GoatTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=default_data_collator,
        compute_metrics=make_compute_metrics(),
    )
    if do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = {**result.metrics, "train_samples": len(trainer.train_dataset)}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    eval_metrics: dict[str, float] = {}
    if do_eval:
        eval_metrics = {**trainer.evaluate(), "eval_samples": len(trainer.eval_dataset)}
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        print(f"Validation accuracy: {eval_metrics['eval_accuracy']:.4f} (chance: {1 / len(labels):.4f})")
    if do_train:
        save_adapter(trainer, model_args, data_args)
    return trainer, eval_metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the example; returns the evaluation metrics (empty without --do_eval)."""
    return run(argv)[1]


if __name__ == "__main__":
    main()
