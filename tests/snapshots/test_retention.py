"""`grad_snapshot_total_limit`: the newest N snapshots stay, older ones go with their tensor files, per folder; and
the callback on a plain Trainer refuses engines whose gradient hooks see shards."""

from __future__ import annotations

import errno
import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import HfArgumentParser, TrainerControl, TrainerState

from hf_gradtools import GradSnapshotCallback, GradTrainer, GradTrainingArguments, load_grad_snapshots
from hf_gradtools.clipping import ClipResult
from hf_gradtools.snapshots import files as snapshot_files
from tests.conftest import classification_data, tiny_classifier


def test_total_limit_keeps_the_newest_snapshots_of_each_folder(args_factory, single_thread):
    args = args_factory(max_steps=5, grad_snapshot_steps=1, grad_snapshot_total_limit=2)
    folder = os.path.join(args.output_dir, "grad_snapshots")
    os.makedirs(folder)
    for name in ("step-00000001.safetensors", "notes.txt"):  # a tensor file of step 1; a file of the user's
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"x")
    named = GradSnapshotCallback(every_n_steps=2, norm_type=1.0, name="l1", total_limit=1)
    trainer = GradTrainer(
        model=tiny_classifier(),
        args=args,
        train_dataset=classification_data(20),
        callbacks=[GradSnapshotCallback(), named],
    )
    trainer.train()
    assert sorted(os.listdir(folder)) == ["notes.txt", "step-00000004.json", "step-00000005.json"]
    assert [s["step"] for s in load_grad_snapshots(args.output_dir, strict=True)] == [4, 5]
    assert os.listdir(os.path.join(args.output_dir, "grad_snapshots_l1")) == ["step-00000004.json"]


def test_no_limit_keeps_all(args_factory, single_thread):
    args = args_factory(max_steps=3, grad_snapshot_steps=1)
    GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(12)).train()
    assert [s["step"] for s in load_grad_snapshots(args.output_dir, strict=True)] == [1, 2, 3]


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_limits_name_the_field(tmp_path, value):
    with pytest.raises(
        ValueError, match=rf"`grad_snapshot_total_limit` must be a positive integer or None.*{value!r}"
    ):
        GradTrainingArguments(str(tmp_path), grad_snapshot_total_limit=value, report_to="none")
    with pytest.raises(ValueError, match=r"`total_limit` must be a positive integer or None"):
        GradSnapshotCallback(total_limit=value)


def test_limit_from_the_command_line(tmp_path):
    parser = HfArgumentParser(GradTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--grad_snapshot_total_limit", "3"])
    assert args.grad_snapshot_total_limit == 3
    (default,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert default.grad_snapshot_total_limit is None


@pytest.mark.parametrize("engine", [{"deepspeed": "ds_config.json"}, {"fsdp": "full_shard"}])
def test_callback_on_a_plain_trainer_refuses_sharding_engines(tmp_path, engine):
    args = SimpleNamespace(output_dir=str(tmp_path), grad_snapshot_steps=1, **engine)
    callback = GradSnapshotCallback()
    name = "DeepSpeed" if "deepspeed" in engine else "FSDP"
    with pytest.raises(ValueError, match=f"cannot record gradient norms under {name}: .* Use GradTrainer"):
        callback.on_train_begin(args, TrainerState(), TrainerControl())
    callback.fed_by_trainer = True  # GradTrainer hands it global norms (FSDP2) or refuses at construction
    callback.on_train_begin(args, TrainerState(), TrainerControl())


def test_a_failed_write_prunes_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "grad_snapshots"
    folder.mkdir()
    for step in (1, 2, 3):
        (folder / f"step-{step:08d}.json").write_text(json.dumps({"step": step, "norms": {}}))

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

    monkeypatch.setattr(snapshot_files, "write_json_atomic", full_disk)
    result = ClipResult(torch.ones(1), torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(OSError, match="No space left"):
        snapshot_files._write_snapshot(str(folder / "step-00000004.json"), 4, 2.0, ["w"], result, keep=1)
    assert sorted(os.listdir(folder)) == [f"step-{step:08d}.json" for step in (1, 2, 3)]
