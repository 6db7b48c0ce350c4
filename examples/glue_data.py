"""The data of a GLUE run: a task of the GLUE benchmark, or your own csv/json files, read and checked.

`describe_task` finds the text columns and the classes (or a regression) and checks every split the run needs
before anything trains; `tokenize_splits` turns the splits into model inputs. `data_args` is run_glue.py's
`DataTrainingArguments`, `training_args` any `TrainingArguments`. A problem is a `ValueError` whose message names
the file or split, the column, and what was expected.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import datasets


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


def file_extension(path: str) -> str:
    """The extension of `path`, lower case and without the dot ('' when none)."""
    return path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""


def load_raw_splits(data_args, cache_dir: str | None):
    """A `DatasetDict` of the splits to use: your own files if given, else `dataset_name`'s task config."""
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
                raise ValueError(f"`{split}_file` {path!r} does not exist (or is not a file).")
            builder = "csv" if file_extension(path) == "csv" else "json"
            try:
                splits[split] = datasets.load_dataset(builder, data_files={split: path}, cache_dir=cache_dir)[split]
            except Exception as error:  # datasets raises many types for a bad file
                raise ValueError(
                    f"`{split}_file` {path!r} could not be read as {builder}: {type(error).__name__}: {error}"
                ) from error
            if len(splits[split]) == 0:
                raise ValueError(f"`{split}_file` {path!r} holds no rows.")
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
        raise ValueError(
            f"Could not load `dataset_name` {data_args.dataset_name!r} with config {config!r}: "
            f"{type(error).__name__}: {_first_line(error)}.{hint}"
        ) from error


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message, without a closing period (the caller adds its own)."""
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else ""


def _source(data_args, split: str) -> str:
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
    raise ValueError(
        f"{where} needs text in a `sentence` column, or in `sentence1` and `sentence2` (or pass `--task_name` to "
        f"use a GLUE task's column names); its columns are {columns}."
    )


def describe_task(raw, data_args, training_args) -> TaskData:
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
        raise ValueError("Nothing to do: pass at least one of `--do_train`, `--do_eval`, `--do_predict`.")
    for split, flag in needed:
        if split not in raw:
            what = f"`--{split}_file`" if own else f"a {split!r} split in {data_args.dataset_name!r}"
            raise ValueError(f"{flag} needs {what}; the data has splits {sorted(raw)}.")

    first = needed[0][0]
    keys = task.sentence_keys if task else _infer_sentence_keys(raw[first].column_names, _source(data_args, first))
    for split, _ in needed:
        columns = raw[split].column_names
        required = list(keys) + ([LABEL] if split not in test_names else [])
        missing = [c for c in required if c not in columns]
        if missing:
            for_what = f" for task {data_args.task_name!r}" if task else ""
            raise ValueError(
                f"{_source(data_args, split)} has no column {', '.join(map(repr, missing))}{for_what}; "
                f"its columns are {columns}."
            )

    labelled = [split for split, _ in needed if LABEL in raw[split].column_names]
    for split in labelled:
        if split not in test_names and None in raw[split].unique(LABEL):  # test labels are optional
            empty = sum(v is None for v in raw[split][LABEL])
            raise ValueError(
                f"{_source(data_args, split)} has {empty} row(s) with an empty `label` cell; fill or drop them."
            )
    feature = raw[labelled[0]].features[LABEL] if labelled else None
    if task is not None:
        is_regression = task.is_regression
    else:
        is_regression = feature is not None and getattr(feature, "dtype", "").startswith("float")

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
            if "train" in labelled:
                trained = set(raw["train"].unique(LABEL))
                unseen = sorted(str(v) for v in values if v not in trained)
                if unseen:
                    warnings.warn(
                        f"The labels {unseen} occur outside the training data ({_source(data_args, 'train')}): the "
                        "model gets a class for each, which it never trains on.",
                        stacklevel=2,
                    )
            if expected and len(label_list) != expected:
                raise ValueError(
                    f"Task {data_args.task_name!r} has {expected} labels but the data's `label` column holds "
                    f"{len(label_list)} distinct values: {label_list[:10]}. Expected the ids 0..{expected - 1} "
                    "or as many distinct names."
                )
        if len(label_list) < 2:
            raise ValueError(
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


def tokenize(split: datasets.Dataset, tokenizer, task: TaskData, max_length: int, pad_to_max_length: bool):
    """The model inputs of `split`: its text columns tokenized, its labels as ids (floats for a regression)."""
    padding = "max_length" if pad_to_max_length else False

    def encode(batch):
        texts = [batch[key] for key in task.sentence_keys]
        encoded = tokenizer(*texts, padding=padding, max_length=max_length, truncation=True)
        if LABEL in batch:
            labels = batch[LABEL]
            if task.is_regression:
                encoded[LABEL] = [float(v) for v in labels]
            elif task.label_to_id is not None:
                encoded[LABEL] = [task.label_to_id.get(v, -1) if v is not None else -1 for v in labels]
            else:
                encoded[LABEL] = labels
        return encoded

    for key in task.sentence_keys:
        if any(text is None for text in split[key]):
            raise ValueError(f"Column `{key}` has empty values; fill or drop those rows.")
    encoded = split.map(encode, batched=True, remove_columns=split.column_names, desc="Tokenizing")
    if LABEL in encoded.column_names:
        # The new `label` column can inherit the text type of the raw one (csv files are read as `large_string`
        # by datasets 5), which the collator cannot make a tensor of: give it the type of the ids it holds.
        target = datasets.Value("float32" if task.is_regression else "int64")
        if encoded.features[LABEL] != target:
            encoded = encoded.cast_column(LABEL, target)
    return encoded


def tokenize_splits(raw: datasets.DatasetDict, tokenizer, task: TaskData, data_args, max_length: int):
    """The tokenized training split (None without `--do_train`), and the eval and test splits by name, each cut
    to its `max_*_samples` rows. Training and eval rows must all have a label; a test split keeps its labels only
    when every row has one."""

    def prepare(split: str, max_rows: int | None):
        data = raw[split]
        if max_rows is not None:
            data = data.select(range(min(max_rows, len(data))))
        return tokenize(data, tokenizer, task, max_length, data_args.pad_to_max_length)

    train = prepare(task.train_split, data_args.max_train_samples) if task.train_split else None
    evals = {split: prepare(split, data_args.max_eval_samples) for split in task.eval_splits}
    for split, data in [("train", train), *evals.items()]:
        if data is not None and not task.is_regression and any(v == -1 for v in data.unique(LABEL)):
            raise ValueError(f"Split {split!r} has rows without a label (empty or -1); drop them first.")
    tests = {}
    for split in task.test_splits:
        data = prepare(split, data_args.max_predict_samples)
        unlabelled = LABEL in data.column_names and any(v == -1 for v in data.unique(LABEL))
        tests[split] = data.remove_columns([LABEL]) if unlabelled else data
    return train, evals, tests
