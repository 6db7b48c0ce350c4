"""Smoke runs of `examples/run_glue.py` on a tiny BERT and a few dozen rows the tests write, and its setup errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import os
import random
import re
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer  # noqa: E402

from hf_gradtools import GradTrainingArguments, load_grad_snapshots  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPT = os.path.join(EXAMPLES, "run_glue.py")
WORDS = "the a movie film plot actor is was not very good great fun bad awful boring and or".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NUM_LAYERS = 3


def _load_script(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sys.path.insert(0, EXAMPLES)  # run_glue.py imports its sibling modules, as when it runs as a script
run_glue = _load_script("run_glue", SCRIPT)
mean_pooling = importlib.import_module("mean_pooling")  # the module run_glue uses
compute_glue_metrics = _load_script(
    "glue_metric", os.path.join(ROOT, "examples", "metrics", "glue", "glue.py")
).compute_glue_metrics


def _tiny_config(**kwargs) -> BertConfig:
    return BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=16,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        **kwargs,
    )


def _save_tokenizer(folder: str) -> None:
    BertTokenizer(vocab={token: i for i, token in enumerate(SPECIAL + WORDS)}).save_pretrained(folder)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    """A bare tiny BERT encoder and its tokenizer: the classifier head is new, sized from the data."""
    folder = str(tmp_path_factory.mktemp("tiny-bert"))
    torch.manual_seed(0)  # the same encoder in every run: the tests compare losses to fixed margins
    BertModel(_tiny_config()).save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(3, 9)))


def _write(path: str, rows: list[dict]) -> str:
    if path.endswith(".csv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def _rows(kind: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    if kind == "single":
        return [{"sentence": _sentence(rng), "label": rng.randint(0, 1), "idx": i} for i in range(n)]
    if kind == "pair":
        return [
            {"sentence1": _sentence(rng), "sentence2": _sentence(rng), "label": rng.randint(0, 1)} for _ in range(n)
        ]
    return [
        {"sentence1": _sentence(rng), "sentence2": _sentence(rng), "label": round(rng.uniform(0, 5), 2)}
        for _ in range(n)
    ]


def _common(model: str, out: str) -> list[str]:
    return [
        "--model_name_or_path", model,
        "--output_dir", out,
        "--max_seq_length", "24",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-3",
        "--save_strategy", "no",
        "--disable_tqdm", "true",
        "--log_level", "error",
    ]  # fmt: skip


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_predictions(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "index\tprediction"
    return [line.split("\t")[1] for line in lines[1:]]


def _numel(folder: str, prefixes: tuple[str, ...]) -> int:
    model = BertForSequenceClassification.from_pretrained(folder)
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefixes))


def _check_snapshots(out: str, steps: list[int], trainable: list[str], norm_type: float, max_norm: float):
    snapshots = load_grad_snapshots(out)
    assert [s["step"] for s in snapshots] == steps
    for snapshot in snapshots:
        assert snapshot["norm_type"] == ("inf" if math.isinf(norm_type) else norm_type)
        assert list(snapshot["norms"]) == trainable
        norms = np.array(list(snapshot["norms"].values()))
        assert np.all(np.isfinite(norms)) and np.all(norms >= 0) and norms.max() > 0
        # The total is the norm of the per-parameter norms, and clipping brings it under `max_grad_norm`.
        expected = norms.max() if math.isinf(norm_type) else (norms**norm_type).sum() ** (1 / norm_type)
        assert snapshot["total_norm_pre_clip"] == pytest.approx(expected, rel=1e-4)
        assert snapshot["total_norm_post_clip"] <= min(max_norm, snapshot["total_norm_pre_clip"]) * (1 + 1e-4)


def test_single_sentence_task_trains_evaluates_predicts(encoder, tmp_path):
    train = _write(str(tmp_path / "train.csv"), _rows("single", 48, seed=0))
    dev_rows = _rows("single", 20, seed=1)
    dev = _write(str(tmp_path / "dev.json"), dev_rows)
    test = _write(str(tmp_path / "test.csv"), [{"sentence": r["sentence"]} for r in dev_rows])  # no labels
    out = str(tmp_path / "out")
    # 48 rows / batch 4 = 12 micro-batches, accumulated by 2: 6 optimizer steps; a snapshot every 2 steps.
    args = _common(encoder, out) + [
        "--task_name", "sst2", "--train_file", train, "--validation_file", dev, "--test_file", test,
        "--do_train", "--do_eval", "--do_predict", "--num_train_epochs", "1", "--gradient_accumulation_steps", "2",
        "--freeze_embeddings", "--freeze_first_n_layers", "1", "--max_grad_norm", "0.5", "--clip_norm_type", "2",
        "--grad_snapshot_steps", "2",
    ]  # fmt: skip
    results = run_glue.main(args)

    assert results["train_samples"] == 48 and results["eval_samples"] == 20
    eval_results = _read_json(os.path.join(out, "eval_results.json"))
    assert 0.0 <= eval_results["eval_accuracy"] <= 1.0 and math.isfinite(eval_results["eval_loss"])
    # The test rows are the validation rows without labels: their predictions reproduce the validation accuracy.
    predictions = [int(p) for p in _read_predictions(os.path.join(out, "predict_results_sst2.txt"))]
    assert len(predictions) == 20 and set(predictions) <= {0, 1}
    expected = compute_glue_metrics("sst2", predictions, [r["label"] for r in dev_rows])["accuracy"]
    assert eval_results["eval_accuracy"] == pytest.approx(expected)
    assert "predict_accuracy" not in results  # no labels, no test metrics

    frozen = _read_json(os.path.join(out, "frozen_parameters.json"))
    assert frozen["layer_stack"] == "bert.encoder.layer" and frozen["embeddings"] == ["bert.embeddings"]
    assert all(n.startswith(("bert.embeddings.", "bert.encoder.layer.0.")) for n in frozen["frozen"])
    assert frozen["num_frozen"] == _numel(out, ("bert.embeddings.", "bert.encoder.layer.0."))
    assert frozen["num_trainable"] == _numel(
        out, ("bert.encoder.layer.1.", "bert.encoder.layer.2.", "bert.pooler.", "classifier.")
    )
    assert frozen["trainable"][-2:] == ["classifier.weight", "classifier.bias"]
    _check_snapshots(out, [2, 4, 6], frozen["trainable"], norm_type=2.0, max_norm=0.5)

    config = _read_json(os.path.join(out, "config.json"))
    assert config["id2label"] == {"0": "0", "1": "1"} and config["finetuning_task"] == "sst2"
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert not any(name.startswith("checkpoint-") for name in os.listdir(out))


def test_sentence_pair_task_with_inf_norm_and_a_json_config(encoder, tmp_path):
    train = _write(str(tmp_path / "train.json"), _rows("pair", 40, seed=2))
    dev_rows = _rows("pair", 24, seed=3)
    dev = _write(str(tmp_path / "dev.csv"), dev_rows)
    out = str(tmp_path / "out")
    # All flags in a JSON config file: `python run_glue.py config.json`.
    config = {
        "model_name_or_path": encoder, "output_dir": out, "task_name": "mrpc", "train_file": train,
        "validation_file": dev, "test_file": dev, "do_train": True, "do_eval": True, "do_predict": True,
        "max_seq_length": 24, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "max_steps": 4,
        "clip_norm_type": "inf", "max_grad_norm": 0.01, "grad_snapshot_steps": 1, "save_strategy": "no",
        "disable_tqdm": True, "log_level": "error",
    }  # fmt: skip
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    results = run_glue.main([str(config_file)])

    # Test file = validation file, with labels: the test metrics equal the validation metrics.
    assert results["eval_accuracy"] == pytest.approx(results["predict_accuracy"])
    assert results["eval_f1"] == pytest.approx(results["predict_f1"])
    predictions = [int(p) for p in _read_predictions(os.path.join(out, "predict_results_mrpc.txt"))]
    expected = compute_glue_metrics("mrpc", predictions, [r["label"] for r in dev_rows])
    assert results["eval_accuracy"] == pytest.approx(expected["accuracy"])
    assert results["eval_f1"] == pytest.approx(expected["f1"])

    frozen = _read_json(os.path.join(out, "frozen_parameters.json"))
    assert frozen["frozen"] == [] and frozen["num_frozen"] == 0
    _check_snapshots(out, [1, 2, 3, 4], frozen["trainable"], norm_type=math.inf, max_norm=0.01)


def test_regression_task(encoder, tmp_path):
    train = _write(str(tmp_path / "train.csv"), _rows("regression", 32, seed=4))
    dev_rows = _rows("regression", 16, seed=5)
    dev = _write(str(tmp_path / "dev.csv"), dev_rows)
    out = str(tmp_path / "out")
    args = _common(encoder, out) + [
        "--task_name", "stsb", "--train_file", train, "--validation_file", dev, "--test_file", dev,
        "--do_train", "--do_eval", "--do_predict", "--num_train_epochs", "1", "--freeze_first_n_layers", "3",
        "--freeze_embeddings",
        "--grad_snapshot_steps", "4", "--clip_norm_type", "1",
    ]  # fmt: skip
    results = run_glue.main(args)

    for key in ("eval_pearson", "eval_spearmanr"):
        assert -1.0 <= results[key] <= 1.0
    scores = [float(p) for p in _read_predictions(os.path.join(out, "predict_results_stsb.txt"))]
    labels = [r["label"] for r in dev_rows]
    # Scores are written in full float32 precision; the frozen tiny model's scores are nearly constant, so their
    # correlation is sensitive to the last bits of the evaluation and prediction passes.
    assert results["eval_pearson"] == pytest.approx(np.corrcoef(scores, labels)[0, 1], abs=1e-3)
    assert _read_json(os.path.join(out, "config.json"))["problem_type"] == "regression"

    frozen = _read_json(os.path.join(out, "frozen_parameters.json"))
    # Every layer frozen: only the pooler and the one-output head train. 32 rows / 4 = 8 steps.
    assert frozen["trainable"] == ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                                   "classifier.bias"]  # fmt: skip
    assert _read_json(os.path.join(out, "train_results.json"))["train_samples"] == 32
    _check_snapshots(out, [4, 8], frozen["trainable"], norm_type=1.0, max_norm=1.0)


def test_lora_keeps_freezing_and_snapshots(encoder, tmp_path):
    train = _write(str(tmp_path / "train.csv"), _rows("single", 16, seed=6))
    out = str(tmp_path / "out")
    args = _common(encoder, out) + [
        "--task_name", "cola", "--train_file", train, "--validation_file", train, "--do_train", "--do_eval",
        "--max_steps", "2", "--use_lora", "--lora_target_modules", "query", "value", "--freeze_first_n_layers", "1",
        "--grad_snapshot_steps", "1",
    ]  # fmt: skip
    results = run_glue.main(args)
    assert -1.0 <= results["eval_matthews_correlation"] <= 1.0

    frozen = _read_json(os.path.join(out, "frozen_parameters.json"))
    assert frozen["layer_stack"] == "base_model.model.bert.encoder.layer"
    trainable = frozen["trainable"]
    lora = [n for n in trainable if ".lora_" in n]
    # query and value of layers 1 and 2 (layer 0 frozen), A and B each.
    assert len(lora) == 8 and not any(".layer.0." in n for n in lora)
    assert [n for n in trainable if n not in lora] == [
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    ]
    assert list(load_grad_snapshots(out)[-1]["norms"]) == trainable
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))


# ---- errors before training ----


def _assert_setup_error(args: list[str], out: str, match: str) -> None:
    with pytest.raises(run_glue.GlueSetupError, match=match):
        run_glue.main(args)
    assert not os.path.exists(out), "a setup error must leave the output folder unwritten"


def test_bad_task_name(encoder, tmp_path):
    out = str(tmp_path / "out")
    _assert_setup_error(
        _common(encoder, out) + ["--task_name", "sst5", "--do_train"],
        out,
        r"`task_name` must be one of cola, .*got 'sst5'",
    )


def test_a_null_max_grad_norm_is_refused_before_loading(encoder, tmp_path):
    out = str(tmp_path / "out")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"task_name": "sst2", "do_train": True, "max_grad_norm": None}))
    _assert_setup_error([str(config)] + _common(encoder, out), out, r"sets `max_grad_norm` to null: leave the flag")


def test_an_empty_label_cell_is_named_before_loading_the_model(encoder, tmp_path):
    rows = _rows("single", 8, seed=7)
    rows[3]["label"] = ""  # read back as a missing value
    train = _write(str(tmp_path / "train.csv"), rows)
    out = str(tmp_path / "out")
    _assert_setup_error(
        _common(encoder, out) + ["--train_file", train, "--do_train"],
        out,
        r"`train_file` '.*train.csv' has 1 row\(s\) with an empty `label` cell; fill or drop them",
    )


def test_labels_seen_only_outside_training_are_warned_about(encoder, tmp_path):
    from datasets import load_dataset
    from glue_data import describe_task

    rows = [{**row, "label": ["pos", "neg"][row["label"]]} for row in _rows("single", 8, seed=7)]
    train = _write(str(tmp_path / "train.csv"), rows)
    validation = _write(str(tmp_path / "validation.csv"), rows[:3] + [{**rows[0], "label": "neutral"}])
    raw = load_dataset("csv", data_files={"train": train, "validation": validation})
    data_args = run_glue.DataTrainingArguments(train_file=train, validation_file=validation)
    args = GradTrainingArguments(output_dir=str(tmp_path / "out"), do_train=True, do_eval=True)
    with pytest.warns(UserWarning, match=r"The labels \['neutral'\] occur outside the training data"):
        task = describe_task(raw, data_args, args)
    assert task.label_list == ["neg", "neutral", "pos"]


def test_missing_column(encoder, tmp_path):
    train = _write(str(tmp_path / "train.csv"), _rows("single", 8, seed=7))
    out = str(tmp_path / "out")
    _assert_setup_error(
        _common(encoder, out) + ["--task_name", "mrpc", "--train_file", train, "--do_train"],
        out,
        r"`train_file` '.*train.csv' has no column 'sentence1', 'sentence2' for task 'mrpc'; its columns are",
    )
    no_label = _write(str(tmp_path / "nolabel.csv"), [{"sentence": "the movie"}, {"sentence": "a plot"}])
    _assert_setup_error(
        _common(encoder, out)
        + [
            "--task_name",
            "sst2",
            "--train_file",
            train,
            "--validation_file",
            no_label,
            "--do_train",
            "--do_eval",
        ],  # fmt: skip
        out,
        r"`validation_file` .* has no column 'label'",
    )


def test_label_count_mismatch(tmp_path):
    folder = str(tmp_path / "three-way")
    BertForSequenceClassification(_tiny_config(num_labels=3)).save_pretrained(folder)
    _save_tokenizer(folder)
    train = _write(str(tmp_path / "train.csv"), _rows("single", 8, seed=8))
    out = str(tmp_path / "out")
    args = _common(folder, out) + ["--task_name", "sst2", "--train_file", train, "--do_train", "--max_steps", "1"]
    _assert_setup_error(
        args,
        out,
        r"sequence-classification checkpoint with num_labels=3 .* but the data has 2 labels .*"
        r"--ignore_mismatched_sizes",
    )
    # Asked for explicitly, a new two-way head replaces the three-way one.
    run_glue.main(args + ["--ignore_mismatched_sizes"])
    assert _read_json(os.path.join(out, "config.json"))["id2label"] == {"0": "0", "1": "1"}


def test_unreadable_files(encoder, tmp_path):
    out = str(tmp_path / "out")
    missing = str(tmp_path / "nope.csv")
    _assert_setup_error(
        _common(encoder, out) + ["--task_name", "sst2", "--train_file", missing, "--do_train"],
        out,
        r"`train_file` '.*nope.csv' does not exist",
    )
    broken = tmp_path / "broken.json"
    broken.write_text('{"sentence": "the movie", "label": 1}\n{"sentence": ')
    _assert_setup_error(
        _common(encoder, out) + ["--task_name", "sst2", "--train_file", str(broken), "--do_train"],
        out,
        r"`train_file` '.*broken.json' could not be read as json",
    )
    _assert_setup_error(
        _common(encoder, out) + ["--task_name", "sst2", "--train_file", str(tmp_path / "data.parquet"), "--do_train"],
        out,
        r"`train_file` must be a .csv, .json or .jsonl file, got '.*data.parquet'",
    )


def test_freezing_too_many_layers_and_missing_split(encoder, tmp_path):
    train = _write(str(tmp_path / "train.csv"), _rows("single", 8, seed=9))
    out = str(tmp_path / "out")
    base = _common(encoder, out) + ["--task_name", "sst2", "--train_file", train]
    _assert_setup_error(base + ["--do_train", "--freeze_first_n_layers", "4"], out, r"has only 3 layers")
    _assert_setup_error(base + ["--do_train", "--do_eval"], out, r"--do_eval needs `--validation_file`")


def test_existing_run_needs_overwrite_and_loses_its_old_snapshots(encoder, tmp_path):
    train = _write(str(tmp_path / "train.csv"), _rows("single", 8, seed=10))
    out = tmp_path / "out"
    stale = out / "grad_snapshots" / "step-00000099.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    args = _common(encoder, str(out)) + [
        "--task_name", "sst2", "--train_file", train, "--do_train", "--max_steps", "2", "--grad_snapshot_steps", "1",
    ]  # fmt: skip
    with pytest.raises(
        run_glue.GlueSetupError, match=r"already holds a run \(grad_snapshots\).*--overwrite_output_dir"
    ):
        run_glue.main(args)
    assert stale.exists()
    run_glue.main(args + ["--overwrite_output_dir"])
    assert sorted(os.listdir(out / "grad_snapshots")) == ["step-00000001.json", "step-00000002.json"]


def test_cli_prints_one_line_and_exits_2(encoder, tmp_path, capsys):
    assert run_glue.cli(_common(encoder, str(tmp_path / "o")) + ["--task_name", "qqp2", "--do_train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run_glue.py: error: `task_name` must be one of")


def test_every_glue_task_is_known():
    assert list(run_glue.GLUE_TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    assert run_glue.GLUE_TASKS["stsb"].is_regression and run_glue.GLUE_TASKS["mnli"].num_labels == 3
    assert run_glue.GLUE_TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    # Task names are matched loosely, as GLUE writes them.
    assert run_glue.DataTrainingArguments(task_name="SST-2").task_name == "sst2"


def test_checkpoint_with_the_same_labels_in_another_order_keeps_its_order(tmp_path):
    folder = str(tmp_path / "reversed")
    config = _tiny_config(num_labels=2, id2label={0: "positive", 1: "negative"})
    BertForSequenceClassification(config).save_pretrained(folder)
    _save_tokenizer(folder)
    model_args = run_glue.ModelArguments(model_name_or_path=folder)
    data_args = run_glue.DataTrainingArguments(task_name="sst2")
    task = run_glue.TaskData(("sentence",), False, ["negative", "positive"], None, "train", [], [])
    config, _, model = run_glue.load_model_and_tokenizer(model_args, data_args, task)
    # Data id 0 ("negative") is the checkpoint's output 1, and the other way round.
    assert task.label_to_id == {0: 1, 1: 0}
    assert config.id2label == {0: "positive", 1: "negative"} and model.config.num_labels == 2


def test_half_precision_checkpoint_loads_as_float32_master_weights(tmp_path):
    """A checkpoint stored in fp16 trains from float32 weights (`--fp16` is autocast on top, as the Trainer
    expects); loaded as stored, fp16's grad scaler would refuse its fp16 gradients."""
    folder = str(tmp_path / "half")
    torch.manual_seed(0)
    stored = BertForSequenceClassification(_tiny_config(num_labels=2)).half()
    stored.save_pretrained(folder)
    _save_tokenizer(folder)
    model_args = run_glue.ModelArguments(model_name_or_path=folder)
    data_args = run_glue.DataTrainingArguments(task_name="sst2")
    task = run_glue.TaskData(("sentence",), False, ["negative", "positive"], None, "train", [], [])
    _, _, model = run_glue.load_model_and_tokenizer(model_args, data_args, task)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(model.classifier.weight, stored.classifier.weight.float(), rtol=0, atol=0)


def test_mnli_from_a_local_folder_laid_out_like_the_hub(encoder, tmp_path):
    from datasets import Dataset

    root = tmp_path / "glue"
    rng = random.Random(11)
    splits = {"train": 24, "validation_matched": 8, "validation_mismatched": 12}
    for split, n in splits.items():
        rows = [{"premise": _sentence(rng), "hypothesis": _sentence(rng), "label": i % 3, "idx": i} for i in range(n)]
        (root / "mnli").mkdir(parents=True, exist_ok=True)
        Dataset.from_list(rows).to_parquet(str(root / "mnli" / f"{split}-00000-of-00001.parquet"))
    files = "".join(f"  - split: {split}\n    path: mnli/{split}-*\n" for split in splits)
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: mnli\n  data_files:\n{files}---\n")
    out = str(tmp_path / "out")
    flags = ["--task_name", "mnli", "--dataset_name", str(root), "--do_train", "--do_eval", "--max_steps", "2"]
    results = run_glue.main(_common(encoder, out) + flags + ["--max_eval_samples", "10"])
    assert results["eval_matched_samples"] == 8 and results["eval_mismatched_samples"] == 10
    for key in ("eval_matched_accuracy", "eval_mismatched_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    # Three classes: a three-way head, named by the dataset's (here unnamed) class ids.
    assert _read_json(os.path.join(out, "config.json"))["id2label"] == {"0": "0", "1": "1", "2": "2"}


# ---- string labels, from every file format ----

STRING_LABEL_CASES = [
    # (file extension, text columns, --task_name or None)
    ("csv", "single", "sst2"),
    ("csv", "pair", None),
    ("json", "single", None),
    ("json", "pair", "mrpc"),
    ("jsonl", "single", "sst2"),
    ("jsonl", "pair", None),
]


def _string_label_rows(kind: str, n: int, seed: int) -> list[dict]:
    names = ("negative", "positive") if kind == "single" else ("different", "same")
    return [
        {**{k: v for k, v in row.items() if k != "idx"}, "label": names[row["label"]]} for row in _rows(kind, n, seed)
    ]


def _write_any(path: str, rows: list[dict]) -> str:
    """csv, JSON lines for .jsonl, and one JSON array for .json (datasets reads both json layouts)."""
    if path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f)
        return path
    return _write(path, rows)


@pytest.mark.parametrize("ext,kind,task_name", STRING_LABEL_CASES)
def test_string_labels_train_evaluate_predict(encoder, tmp_path, recwarn, ext, kind, task_name):
    train = _write_any(str(tmp_path / f"train.{ext}"), _string_label_rows(kind, 16, seed=20))
    dev_rows = _string_label_rows(kind, 12, seed=21)
    dev = _write_any(str(tmp_path / f"dev.{ext}"), dev_rows)
    test = _write_any(str(tmp_path / f"test.{ext}"), [{k: v for k, v in r.items() if k != "label"} for r in dev_rows])
    out = str(tmp_path / "out")
    flags = ["--task_name", task_name] if task_name else []
    results = run_glue.main(
        _common(encoder, out)
        + flags
        + ["--train_file", train, "--validation_file", dev, "--test_file", test, "--do_train", "--do_eval"]
        + ["--do_predict", "--max_steps", "2"]
    )
    names = ["negative", "positive"] if kind == "single" else ["different", "same"]
    # The classes are the sorted distinct names, and the model's config names them.
    assert _read_json(os.path.join(out, "config.json"))["id2label"] == {"0": names[0], "1": names[1]}
    predictions = _read_predictions(os.path.join(out, f"predict_results_{task_name or 'test'}.txt"))
    assert len(predictions) == 12 and set(predictions) <= set(names)
    # The test rows are the validation rows without labels: the predictions give the validation accuracy.
    correct = [p == r["label"] for p, r in zip(predictions, dev_rows, strict=True)]
    assert results["eval_accuracy"] == pytest.approx(sum(correct) / len(correct))
    assert not [w for w in recwarn if "pin_memory" in str(w.message)], "no pin_memory warning on a CPU run"


SHARED_GLUE = os.path.join(ROOT, "..", "shared", "glue")


@pytest.mark.parametrize("task", ["sst2", "mrpc", "cola"])
def test_glue_label_names_are_the_datasets_in_its_order(task):
    if not os.path.isdir(os.path.join(SHARED_GLUE, task)):
        pytest.skip("no local GLUE copy at ../shared/glue")
    import datasets

    features = datasets.load_dataset(SHARED_GLUE, task, split="validation").features
    assert run_glue.GLUE_TASKS[task].label_names == tuple(features["label"].names)


@pytest.mark.parametrize("ext", ["csv", "json"])
def test_text_labels_named_as_the_task_take_its_order_and_f1_is_of_its_class_1(encoder, tmp_path, ext):
    """MRPC labelled `equivalent` / `not_equivalent`: sorted, `equivalent` would be id 0 and F1 of the wrong class."""
    names = ("not_equivalent", "equivalent")

    def rows(n, seed):  # about 70% equivalent, as in MRPC: the F1 of the two classes differ
        rng = random.Random(seed)
        return [{**row, "label": names[int(rng.random() < 0.7)]} for row in _rows("pair", n, seed)]

    train = _write_any(str(tmp_path / f"train.{ext}"), rows(16, seed=30))
    dev_rows = rows(24, seed=31)
    dev = _write_any(str(tmp_path / f"dev.{ext}"), dev_rows)
    test = _write_any(str(tmp_path / f"test.{ext}"), [{k: v for k, v in r.items() if k != "label"} for r in dev_rows])
    out = str(tmp_path / "out")
    results = run_glue.main(
        _common(encoder, out)
        + ["--task_name", "mrpc", "--train_file", train, "--validation_file", dev, "--test_file", test]
        + ["--do_train", "--do_eval", "--do_predict", "--max_steps", "2"]
    )
    assert _read_json(os.path.join(out, "config.json"))["id2label"] == {"0": "not_equivalent", "1": "equivalent"}
    predictions = _read_predictions(os.path.join(out, "predict_results_mrpc.txt"))
    truth = [r["label"] for r in dev_rows]

    def f1_of(name):
        hit = sum(p == t == name for p, t in zip(predictions, truth, strict=True))
        return 2 * hit / (predictions.count(name) + truth.count(name))

    assert f1_of("equivalent") != pytest.approx(f1_of("not_equivalent"))
    assert results["eval_f1"] == pytest.approx(f1_of("equivalent"))
    assert results["eval_accuracy"] == pytest.approx(
        np.mean([p == t for p, t in zip(predictions, truth, strict=True)])
    )


# ---- bad inputs: one line, exit status 2, nothing written ----


def _assert_cli_error(args: list[str], capsys, match: str, after_loading: bool = False) -> str:
    """One `run_glue.py: error:` line on stderr and exit status 2; `after_loading`: an error found once the data
    and the model are loaded, after their progress bars (datasets' and transformers' tqdm lines)."""
    assert run_glue.cli(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    if after_loading:
        lines = [line for line in lines if line.strip() and not re.search(r"\[\d\d:\d\d", line)]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("run_glue.py: error: ")
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


def test_output_dir_that_is_a_file(encoder, tmp_path, capsys):
    train = _write(str(tmp_path / "train.csv"), _rows("single", 8, seed=22))
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    before = sorted(os.listdir(tmp_path))
    base = ["--task_name", "sst2", "--train_file", train, "--do_train", "--max_steps", "1"]
    _assert_cli_error(_common(encoder, str(target)) + base, capsys, r"`output_dir` '.*results.txt' is a file")
    _assert_cli_error(
        _common(encoder, str(target / "run")) + base, capsys, r"is inside '.*results.txt', which is a file"
    )
    assert target.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == before


def test_bad_flag_value_is_one_line_that_names_the_flag_and_the_value(encoder, tmp_path, capsys):
    out = str(tmp_path / "out")
    base = _common(encoder, out) + ["--task_name", "sst2", "--do_train"]
    _assert_cli_error(base + ["--clip_norm_type", "abc"], capsys, r"--clip_norm_type\S*: invalid float value: 'abc'")
    _assert_cli_error(base + ["--max_steps", "ten"], capsys, r"--max_steps\S*: invalid int value: 'ten'")
    _assert_cli_error(base + ["--no_such_flag", "1"], capsys, r"not used by the HfArgumentParser.*--no_such_flag")
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    "flags,field",
    [
        (["--grad_snapshot_steps", "1", "--grad_snapshot_tensors", r"^clasifier\."], "grad_snapshot_tensors"),
        (["--clip_algorithm", "agc", "--agc_exclude", "clasifier"], "agc_exclude"),
    ],
)
def test_a_pattern_that_matches_no_parameter_is_one_line(encoder, tmp_path, capsys, flags, field):
    train = _write(str(tmp_path / "train.csv"), _rows("single", 8, seed=24))
    out = str(tmp_path / "out")
    base = _common(encoder, out) + ["--task_name", "sst2", "--train_file", train, "--do_train", "--max_steps", "1"]
    line = _assert_cli_error(base + flags, capsys, rf"`{field}` pattern '.*clasifier.*' matches no parameter", True)
    assert "'bert.embeddings.word_embeddings.weight'" in line  # what the names look like
    assert not os.path.exists(out)


def test_help_lists_the_gradient_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_glue.build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    usage, rest = text.split("\n", 1)
    assert len(usage) < 120  # a short usage line, not every flag
    for flag in ("--freeze_embeddings", "--freeze_first_n_layers", "--clip_norm_type", "--clip_grad_value",
                 "--grad_snapshot_steps", "--max_grad_norm", "--gradient_accumulation_steps"):  # fmt: skip
        assert flag in rest
    assert rest.index("\nmodel and LoRA:\n") < rest.index("\ndata:\n")  # the groups of the argument dataclasses
    assert "(CoLA: 70% acceptable)" in " ".join(text.split())  # a literal %, not argparse's formatting


# ---- the degenerate-run warning ----


def _classifier_checkpoint(folder: str, split_at_median: bool) -> str:
    """A tiny classifier that answers class 1 for everything, or one whose bias splits the dev rows in two."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(_tiny_config(num_labels=2)).eval()
    _save_tokenizer(folder)
    with torch.no_grad():
        if split_at_median:
            model.classifier.weight.mul_(1000.0)
            tokenizer = BertTokenizer.from_pretrained(folder)
            texts = [row["sentence"] for row in _rows("single", 24, seed=23)]
            logits = torch.cat([model(**tokenizer(text, return_tensors="pt")).logits for text in texts])
            margin = logits[:, 1] - logits[:, 0]
            model.classifier.bias[1] -= margin.median() + 1e-3 * margin.std()
        else:
            model.classifier.bias.copy_(torch.tensor([0.0, 50.0]))
    model.save_pretrained(folder)
    return folder


def _evaluate_only(model: str, tmp_path, caplog) -> dict:
    dev = _write(str(tmp_path / "dev.csv"), _rows("single", 24, seed=23))
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="run_glue"):
        return run_glue.main(_common(model, out) + ["--task_name", "sst2", "--validation_file", dev, "--do_eval"])


def test_degenerate_warning_fires_when_every_prediction_is_one_class(tmp_path, caplog):
    model = _classifier_checkpoint(str(tmp_path / "always-positive"), split_at_median=False)
    results = _evaluate_only(model, tmp_path, caplog)
    assert results["eval_top_class"] == 1 and results["eval_top_class_share"] == 1.0
    warnings = [r.getMessage() for r in caplog.records if "Degenerate run" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "all 24 predictions on 'validation' are class 1 '1' (100%)" in warnings[0]


def test_degenerate_warning_stays_quiet_when_predictions_differ(tmp_path, caplog):
    model = _classifier_checkpoint(str(tmp_path / "mixed"), split_at_median=True)
    results = _evaluate_only(model, tmp_path, caplog)
    assert 0.5 <= results["eval_top_class_share"] < 0.7
    assert not [r for r in caplog.records if "Degenerate run" in r.getMessage()]


def test_one_class_message():
    assert run_glue.one_class_message("test", 5, 0, 0.8, ["no", "yes"]) is None
    message = run_glue.one_class_message("test", 5, 0, 1.0, ["no", "yes"])
    assert message.startswith("Degenerate run: all 5 predictions on 'test' are class 0 'no' (100%)")
    assert run_glue.prediction_spread(np.array([2, 2, 0, 2])) == {"top_class": 2, "top_class_share": 0.75}


def test_missing_dataset_folder_is_one_sentence(encoder, tmp_path, capsys):
    missing = str(tmp_path / "no-such-glue")
    line = _assert_cli_error(
        _common(encoder, str(tmp_path / "out")) + ["--task_name", "sst2", "--dataset_name", missing, "--do_train"],
        capsys,
        r"Could not load `dataset_name` '.*no-such-glue' with config 'sst2'",
    )
    assert ".." not in line.replace("../shared", "")


# ---- class weights ----


def test_balanced_class_weights_weigh_each_row_by_its_class():
    from datasets import Dataset

    task = run_glue.TaskData(("sentence",), False, ["no", "yes"], None, "train", [], [])
    loss = run_glue.class_weighted_loss(Dataset.from_dict({"label": [1, 1, 1, 0]}), task)
    logits = torch.tensor([[0.2, -0.4], [1.0, 0.5], [-0.3, 0.9]])
    labels = torch.tensor([0, 1, 1])
    # 4 rows, 2 classes: class 0 (1 row) weighs 4 / (2 x 1) = 2, class 1 (3 rows) 4 / (2 x 3) = 2/3.
    per_row = -torch.log_softmax(logits, dim=-1)[torch.arange(3), labels]
    weighted = per_row * torch.tensor([2.0, 2 / 3, 2 / 3])
    torch.testing.assert_close(loss({"logits": logits}, labels), weighted.mean())
    # Given the window's row count, the Trainer's convention: a sum over that count.
    torch.testing.assert_close(loss({"logits": logits}, labels, num_items_in_batch=5), weighted.sum() / 5)


def test_balanced_class_weights_train_and_are_logged(encoder, tmp_path, caplog):
    train = _write(str(tmp_path / "train.csv"), _rows("single", 12, seed=30))
    counts = np.bincount([r["label"] for r in _rows("single", 12, seed=30)], minlength=2)
    args = _common(encoder, str(tmp_path / "out")) + [
        "--task_name", "sst2", "--train_file", train, "--do_train", "--max_steps", "2", "--class_weights", "balanced",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="run_glue"):
        run_glue.main(args)
    expected = ", ".join(f"{12 / (2 * c):.3f}" for c in counts)
    assert f"Class weights (balanced), by label id: {expected}" in caplog.text


@pytest.mark.parametrize("kind", ["regression", "no training"])
def test_balanced_class_weights_refused_before_anything_is_written(encoder, tmp_path, capsys, kind):
    rows = _rows("regression" if kind == "regression" else "single", 8, seed=31)
    data = _write(str(tmp_path / "data.csv"), rows)
    out = str(tmp_path / "out")
    task = ["--task_name", "stsb", "--train_file", data, "--do_train"] if kind == "regression" else [
        "--task_name", "sst2", "--validation_file", data, "--do_eval"]  # fmt: skip
    why = "this task is a regression" if kind == "regression" else "it counts the training rows: pass --do_train"
    _assert_cli_error(_common(encoder, out) + task + ["--class_weights", "balanced"], capsys, re.escape(why))
    assert not os.path.exists(out)


def test_a_class_without_training_rows_weighs_one(caplog):
    from datasets import Dataset

    task = run_glue.TaskData(("sentence",), False, ["neg", "neu", "pos"], None, "train", [], [])
    with caplog.at_level(logging.WARNING, logger="run_glue"):
        loss = run_glue.class_weighted_loss(Dataset.from_dict({"label": [0, 0, 0, 2]}), task)
    assert "No training row has label id 1" in caplog.text
    logits, labels = torch.zeros(3, 3), torch.tensor([0, 1, 2])
    # 4 rows, 3 classes: 4 / (3 x 3), 1 (absent), 4 / (3 x 1); uniform logits: each row's loss is log 3.
    expected = math.log(3) * (4 / 9 + 1 + 4 / 3) / 3
    assert loss({"logits": logits}, labels).item() == pytest.approx(expected, rel=1e-6)


def test_mean_pooling_feeds_the_classifier_the_masked_mean_of_the_token_states():
    torch.manual_seed(0)
    model = BertForSequenceClassification(_tiny_config(num_labels=2)).eval()
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    cls_logits = model(input_ids=ids, attention_mask=mask).logits
    mean_pooling.use_mean_pooling(model)
    logits = model(input_ids=ids, attention_mask=mask).logits

    hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    mean = torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])  # the padding token is left out
    expected = model.classifier(torch.tanh(model.bert.pooler.dense(mean)))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(logits, cls_logits, atol=1e-4)
    # The same sentence without its padding gets the same logits.
    torch.testing.assert_close(model(input_ids=ids[1:, :4]).logits[0], logits[1], rtol=0, atol=1e-6)
    assert model.config.classifier_pooling == "mean"


def test_mean_pooling_is_recorded_and_applied_again_when_the_saved_model_is_loaded(encoder, tmp_path):
    train = _write(str(tmp_path / "train.csv"), _rows("single", 24, seed=30))
    dev = _write(str(tmp_path / "dev.csv"), _rows("single", 16, seed=31))
    data = ["--task_name", "sst2", "--validation_file", dev, "--do_eval"]
    out = str(tmp_path / "out")
    trained = run_glue.main(
        _common(encoder, out) + data + ["--train_file", train, "--do_train", "--classifier_pooling", "mean"]
    )
    assert _read_json(os.path.join(out, "config.json"))["classifier_pooling"] == "mean"

    # Evaluating the saved folder reads the mean again without being told; `cls` overrides it.
    again = run_glue.main(_common(out, str(tmp_path / "again")) + data)
    assert again["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-6)
    first_token = run_glue.main(_common(out, str(tmp_path / "cls")) + data + ["--classifier_pooling", "cls"])
    assert abs(first_token["eval_loss"] - trained["eval_loss"]) > 1e-4
    retrained = str(tmp_path / "retrained")
    run_glue.main(
        _common(out, retrained) + data + ["--train_file", train, "--do_train", "--max_steps", "1"]
        + ["--classifier_pooling", "cls"]
    )  # fmt: skip
    assert "classifier_pooling" not in _read_json(os.path.join(retrained, "config.json"))

    # Without the flag nothing is recorded: the config is the Trainer example's.
    plain = str(tmp_path / "plain")
    run_glue.main(_common(encoder, plain) + data + ["--train_file", train, "--do_train"])
    assert "classifier_pooling" not in _read_json(os.path.join(plain, "config.json"))


def test_a_resumed_run_keeps_the_pooling_of_its_checkpoint(encoder, tmp_path):
    train = _write(str(tmp_path / "train.csv"), _rows("single", 16, seed=32))
    first = str(tmp_path / "first")
    base = _common(encoder, first) + ["--task_name", "sst2", "--train_file", train, "--do_train"]
    run_glue.main(
        base + ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--classifier_pooling", "mean"]
    )
    checkpoint = os.path.join(first, "checkpoint-1")
    resumed = str(tmp_path / "resumed")
    args = _common(encoder, resumed) + ["--task_name", "sst2", "--train_file", train, "--do_train", "--max_steps", "2"]
    run_glue.main(args + ["--resume_from_checkpoint", checkpoint])
    assert _read_json(os.path.join(resumed, "config.json"))["classifier_pooling"] == "mean"
    # The resumed run ends on the same weights as the uninterrupted one: it trained the same head.
    from safetensors.torch import load_file

    for name, weight in load_file(os.path.join(first, "model.safetensors")).items():
        torch.testing.assert_close(load_file(os.path.join(resumed, "model.safetensors"))[name], weight)
    other = str(tmp_path / "other")
    _assert_setup_error(
        _common(encoder, other) + ["--task_name", "sst2", "--train_file", train, "--do_train", "--max_steps", "2"]
        + ["--resume_from_checkpoint", checkpoint, "--classifier_pooling", "cls"],
        other,
        r"`classifier_pooling` 'cls', but checkpoint .*checkpoint-1' was trained with 'mean'",
    )  # fmt: skip


def test_lora_with_mean_pooling_warns_that_the_adapter_does_not_record_it(encoder, tmp_path, caplog):
    train = _write(str(tmp_path / "train.csv"), _rows("single", 8, seed=33))
    args = _common(encoder, str(tmp_path / "out")) + [
        "--task_name", "sst2", "--train_file", train, "--do_train", "--max_steps", "1", "--use_lora",
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="run_glue"):
        run_glue.main(args + ["--classifier_pooling", "mean"])
    assert [r for r in caplog.records if "nothing there records `classifier_pooling` 'mean'" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="run_glue"):
        run_glue.main(args + ["--overwrite_output_dir"])
    assert not [r for r in caplog.records if "classifier_pooling" in r.getMessage()]


def test_a_model_with_its_own_classifier_pooling_gets_the_flag_in_its_config(tmp_path):
    from transformers import ModernBertConfig, ModernBertModel

    folder = str(tmp_path / "tiny-modernbert")
    config = ModernBertConfig(
        vocab_size=len(SPECIAL) + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        cls_token_id=2, sep_token_id=3,
    )  # fmt: skip
    ModernBertModel(config).save_pretrained(folder)
    _save_tokenizer(folder)
    train = _write(str(tmp_path / "train.csv"), _rows("single", 8, seed=34))
    out = str(tmp_path / "out")
    args = _common(folder, out) + ["--task_name", "sst2", "--train_file", train, "--do_train", "--max_steps", "1"]
    run_glue.main(args + ["--classifier_pooling", "mean"])
    assert _read_json(os.path.join(out, "config.json"))["classifier_pooling"] == "mean"  # its own field, no hook


def test_mean_pooling_needs_a_bert_style_pooler():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    with pytest.raises(ValueError, match=r"`classifier_pooling` 'mean' needs a BERT-style pooler"):
        mean_pooling.use_mean_pooling(RobertaForSequenceClassification(config))


@pytest.mark.parametrize(
    "field,value,allowed",
    [("classifier_pooling", "max", "cls, mean"), ("class_weights", "inverse", "none, balanced")],
    ids=["pooling", "weights"],
)
def test_a_bad_choice_in_a_json_config_names_the_field(encoder, tmp_path, capsys, field, value, allowed):
    out = str(tmp_path / "out")
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {"task_name": "sst2", "model_name_or_path": encoder, "output_dir": out, "do_train": True, field: value}
        )
    )
    _assert_cli_error([str(config)], capsys, rf"`{field}` must be one of {allowed}, got '{value}'")
    assert not os.path.exists(out)


@pytest.mark.parametrize("task", ["sst2", "mrpc", "cola"])
def test_every_recipe_parses_and_reads_the_shared_glue_copy(task):
    model_args, data_args, training_args = run_glue.parse_args(
        [os.path.join(ROOT, "examples", "recipes", f"{task}.json")]
    )
    assert data_args.task_name == task and data_args.dataset_name == "../shared/glue"
    assert training_args.do_train and training_args.do_eval and training_args.output_dir == f"outputs/recipes/{task}"
    assert model_args.model_name_or_path is None  # the default model


def test_flags_after_a_json_config_override_its_values(tmp_path):
    recipe = os.path.join(ROOT, "examples", "recipes", "sst2.json")
    elsewhere = str(tmp_path / "glue")
    model_args, data_args, training_args = run_glue.parse_args(
        [recipe, "--dataset_name", elsewhere, "--seed", "43", "--freeze_embeddings", "false"]
    )
    assert (data_args.dataset_name, training_args.seed, training_args.freeze_embeddings) == (elsewhere, 43, False)
    assert data_args.task_name == "sst2" and training_args.freeze_first_n_layers == 2  # the rest from the file
    with pytest.raises(run_glue.GlueSetupError, match=r"Unknown flags after '.*sst2.json': --bogus 1"):
        run_glue.parse_args([recipe, "--bogus", "1"])


def test_a_config_file_that_is_not_valid_json_or_sets_null_is_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"task_name": "sst2",\n}')
    with pytest.raises(run_glue.GlueSetupError, match=r"Config file '.*broken.json' is not valid JSON: Expecting"):
        run_glue.parse_args([str(broken)])
    null = tmp_path / "NULL.JSON"  # the extension in any case
    null.write_text(json.dumps({"task_name": "sst2", "output_dir": "out", "clip_norm_type": None}))
    with pytest.raises(run_glue.GlueSetupError, match=r"sets `clip_norm_type` to null: leave the flag out"):
        run_glue.parse_args([str(null), "--seed", "1"])


@pytest.mark.parametrize("value", ["nowhere", "out/checkpoint-9", "empty"])
def test_a_checkpoint_that_is_not_a_folder_is_refused_before_loading(encoder, tmp_path, value):
    out = str(tmp_path / "out")
    if value == "empty":
        value = str(tmp_path / "empty")
        os.mkdir(value)
    what = "holds no trainer_state.json \\(not a checkpoint\\)" if "empty" in value else "is not a folder"
    _assert_setup_error(
        _common(encoder, out) + ["--task_name", "sst2", "--do_train", "--resume_from_checkpoint", value],
        out,
        rf"`resume_from_checkpoint` '{value}' {what}: pass a checkpoint folder .* or `true` for the last",
    )


def test_true_or_last_resumes_from_the_last_checkpoint(tmp_path):
    from types import SimpleNamespace

    for value in ("true", "True", "last"):
        args = SimpleNamespace(resume_from_checkpoint=value, do_train=True, output_dir=str(tmp_path))
        with pytest.raises(run_glue.GlueSetupError, match=r"holds no checkpoint to resume from"):
            run_glue.resume_checkpoint(args)  # before the data and the model load
        (tmp_path / "checkpoint-3").mkdir(exist_ok=True)
        assert run_glue.resume_checkpoint(args) is True  # `Trainer.train(resume_from_checkpoint=True)`
        (tmp_path / "checkpoint-3").rmdir()
    missing = SimpleNamespace(resume_from_checkpoint="true", do_train=True, output_dir=str(tmp_path / "none"))
    with pytest.raises(run_glue.GlueSetupError, match=r"holds no checkpoint to resume from"):
        run_glue.resume_checkpoint(missing)
    (tmp_path / "trainer_state.json").write_text("{}")  # a checkpoint folder (its files are checked at train())
    args = SimpleNamespace(resume_from_checkpoint=str(tmp_path), do_train=True, output_dir=str(tmp_path))
    assert run_glue.resume_checkpoint(args) == str(tmp_path)
    assert run_glue.resume_checkpoint(SimpleNamespace(resume_from_checkpoint=None, do_train=True)) is None
