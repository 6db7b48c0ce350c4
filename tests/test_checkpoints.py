"""Resuming picks the last checkpoint whose save finished, next to half-written ones that a kill left behind."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import classification_data, tiny_classifier
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_gradtools import GradTrainer
from hf_gradtools.checkpoints import (
    RUN_SETTINGS_FILE,
    ChangedSettingsError,
    begin_checkpoint_save,
    check_resume_settings,
    checkpoint_problem,
    is_complete_checkpoint,
    last_complete_checkpoint,
    list_checkpoints,
    resolve_resume_checkpoint,
    run_settings,
    save_run_settings,
)


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = control.should_training_stop or state.global_step >= self.step


def train(args_factory, trainer_class=GradTrainer, resume=None, stop_at=None, **overrides):
    args = args_factory(per_device_train_batch_size=2, save_strategy="steps", save_steps=2, max_steps=4, **overrides)
    callbacks = [StopAt(stop_at)] if stop_at else None
    trainer = trainer_class(
        model=tiny_classifier(), args=args, train_dataset=classification_data(16), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def half_written(complete: str, step: int, keep: tuple[str, ...]) -> str:
    """A copy of `complete` as a kill during the save of `checkpoint-<step>` leaves it: only the files in `keep`."""
    folder = os.path.join(os.path.dirname(complete), f"checkpoint-{step}")
    os.makedirs(folder)
    for name in keep:
        shutil.copy(os.path.join(complete, name), folder)
    return folder


@pytest.fixture
def run_dir(args_factory):
    """A real checkpoint-2 of GradTrainer, a checkpoint-4 killed before trainer_state.json, a checkpoint-6 killed
    while writing it."""
    trainer = train(args_factory, stop_at=2)  # the schedule of a 4-step run, stopped after step 2
    out = trainer.args.output_dir
    complete = os.path.join(out, "checkpoint-2")
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(os.listdir(complete))
    half_written(complete, 4, ("config.json", "model.safetensors", "optimizer.pt"))
    six = half_written(complete, 6, ("config.json", "model.safetensors", "optimizer.pt", "scheduler.pt"))
    with open(os.path.join(complete, "trainer_state.json")) as f:
        state = f.read()
    with open(os.path.join(six, "trainer_state.json"), "w") as f:
        f.write(state[: len(state) // 2])
    return out


def test_last_complete_checkpoint_skips_half_written_ones(run_dir, caplog):
    assert get_last_checkpoint(run_dir).endswith("checkpoint-6")  # what the Trainer itself would pick
    assert [os.path.basename(p) for p in list_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    with caplog.at_level(logging.INFO, logger="hf_gradtools.checkpoints"):
        found = last_complete_checkpoint(run_dir)
    assert found == os.path.join(run_dir, "checkpoint-2")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "checkpoint-6" in lines[0] and "unreadable" in lines[0]
    assert "checkpoint-4" in lines[1] and "no trainer_state.json" in lines[1]
    assert resolve_resume_checkpoint(run_dir, True) == found
    assert resolve_resume_checkpoint(run_dir, False) is None
    assert resolve_resume_checkpoint(run_dir, None) is None
    explicit = os.path.join(run_dir, "checkpoint-4")
    assert resolve_resume_checkpoint(run_dir, explicit) == explicit


def test_resume_from_the_last_complete_checkpoint_and_save_over_the_half_written_one(run_dir, args_factory, caplog):
    with caplog.at_level(logging.INFO, logger="hf_gradtools.checkpoints"):
        trainer = train(args_factory, resume=True)  # GradTrainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping incomplete")]
    assert [m.split(":")[0].rsplit(os.sep, 1)[-1] for m in skipped] == ["checkpoint-6", "checkpoint-4"]
    assert is_complete_checkpoint(os.path.join(run_dir, "checkpoint-4"))
    reference = train(args_factory, output_dir=os.path.join(run_dir, "..", "reference"))
    for (name, a), b in zip(trainer.model.named_parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_resaving_a_checkpoint_marks_it_incomplete_until_done(run_dir):
    complete = os.path.join(run_dir, "checkpoint-2")
    begin_checkpoint_save(complete)  # a resumed run starts saving step 2 again, and is killed
    assert checkpoint_problem(complete) == "no trainer_state.json (the save did not finish)"
    begin_checkpoint_save(os.path.join(run_dir, "checkpoint-8"))  # not there yet: nothing to do
    assert not os.path.exists(os.path.join(run_dir, "checkpoint-8"))
    with pytest.raises(ValueError, match=r"No valid checkpoint found in output directory \(.*out\)"):
        resolve_resume_checkpoint(run_dir, True)


def test_what_counts_as_complete(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (folder / "training_args.bin").write_bytes(b"x")
    assert checkpoint_problem(folder) == "no model weights"  # e.g. weights deleted by a rotation cut short
    (folder / "pytorch_model_fsdp_0").mkdir()
    assert is_complete_checkpoint(folder)
    (folder / "trainer_state.json").write_text("[]")
    assert checkpoint_problem(folder) == "trainer_state.json is not a Trainer state"
    (folder / "checkpoint-x").mkdir()
    assert list_checkpoints(tmp_path) == [str(folder)]
    (tmp_path / "checkpoint-9").write_text("a file, not a folder")
    assert list_checkpoints(tmp_path) == [str(folder)]
    assert list_checkpoints(tmp_path / "missing") == [] and last_complete_checkpoint(tmp_path / "missing") is None


def test_checkpoints_record_freeze_settings_only_when_something_is_frozen(run_dir, args_factory, tmp_path):
    # A default run's checkpoints hold the Trainer's files alone.
    assert not os.path.exists(os.path.join(run_dir, "checkpoint-2", RUN_SETTINGS_FILE))
    settings = run_settings(args_factory(freeze_first_n_layers=1, per_device_train_batch_size=2))
    save_run_settings(tmp_path, settings)
    with open(tmp_path / RUN_SETTINGS_FILE) as f:
        assert json.load(f) == {"freeze_embeddings": False, "freeze_first_n_layers": 1, "world_size": 1, "batch": 2}


@pytest.mark.parametrize(
    "changed, now",
    [
        ({"freeze_embeddings": True}, "`freeze_embeddings`=True, `freeze_first_n_layers`=0"),
        ({"freeze_first_n_layers": 1}, "`freeze_embeddings`=False, `freeze_first_n_layers`=1"),
    ],
)
def test_resume_with_other_freeze_settings_is_refused_before_anything_changes(run_dir, args_factory, changed, now):
    snapshots = os.path.join(run_dir, "grad_snapshots")
    os.makedirs(snapshots)
    later = os.path.join(snapshots, "step-00000003.json")  # of a step after checkpoint-2: kept, nothing resumed
    with open(later, "w") as f:
        json.dump({"step": 3, "norms": {}}, f)
    before = sorted(os.listdir(os.path.join(run_dir, "checkpoint-2")))
    then = "`freeze_embeddings`=False, `freeze_first_n_layers`=0"
    with pytest.raises(ChangedSettingsError, match=rf"checkpoint-2: it was saved with {then}, and this run has {now}"):
        train(args_factory, resume=True, **changed)
    assert os.path.exists(later) and sorted(os.listdir(os.path.join(run_dir, "checkpoint-2"))) == before
    assert not os.path.exists(os.path.join(run_dir, "checkpoint-4", "trainer_state.json"))


def test_checkpoint_without_settings_resumes_unchecked(run_dir, args_factory, caplog):
    assert not os.path.exists(os.path.join(run_dir, "checkpoint-2", RUN_SETTINGS_FILE))  # a default run writes none
    with caplog.at_level(logging.INFO, logger="hf_gradtools.checkpoints"):
        trainer = train(args_factory, resume=True)
    assert trainer.state.global_step == 4
    assert any("records no gradient-tool settings" in r.getMessage() for r in caplog.records)


def test_other_world_size_is_resumed_with_a_warning(tmp_path, caplog):
    saved = {"freeze_embeddings": True, "freeze_first_n_layers": 2, "world_size": 2, "batch": 8}
    (tmp_path / RUN_SETTINGS_FILE).write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="hf_gradtools.checkpoints"):
        check_resume_settings(tmp_path, {**saved, "world_size": 1, "batch": 4})
    (message,) = [r.getMessage() for r in caplog.records]
    assert "saved by 2 process(es), with 1" in message and "takes 4 rows, where it took 8" in message
