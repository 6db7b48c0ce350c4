"""Resuming picks the last checkpoint whose save finished, next to half-written ones that a kill left behind."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import get_last_checkpoint

from hf_gradtools import GradTrainer
from hf_gradtools.checkpoints import (
    RUN_SETTINGS_FILE,
    ChangedSettingsError,
    begin_checkpoint_save,
    check_resume_settings,
    checkpoint_problem,
    checkpoint_save_error,
    is_complete_checkpoint,
    last_complete_checkpoint,
    list_checkpoints,
    resolve_resume_checkpoint,
    run_settings,
    save_run_settings,
)
from hf_gradtools.snapshots import callback as snapshot_callback
from tests.conftest import classification_data, folder_contents, tiny_classifier


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


def test_resaving_a_checkpoint_removes_the_temporary_files_of_the_cut_save(run_dir):
    folder = os.path.join(run_dir, "checkpoint-4")  # half-written: the kill also left the writes in progress
    cut = [".tmpQ7x2Za", ".hf_gradtools_state.json.123.456.tmp"]  # safetensors' weights, an atomic write
    kept = ["notes.tmp", ".tmp", ".tmpdir-long-name"]
    for name in cut + kept:
        with open(os.path.join(folder, name), "w") as f:
            f.write("x")
    before = set(os.listdir(folder))
    begin_checkpoint_save(folder)
    assert set(os.listdir(folder)) == before - set(cut)


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
        ({"freeze_embeddings": True}, "`freeze_embeddings`=True"),
        ({"freeze_first_n_layers": 1}, "`freeze_first_n_layers`=1"),
    ],
)
def test_resume_with_other_freeze_settings_is_refused_before_anything_changes(run_dir, args_factory, changed, now):
    snapshots = os.path.join(run_dir, "grad_snapshots")
    os.makedirs(snapshots)
    later = os.path.join(snapshots, "step-00000003.json")  # of a step after checkpoint-2: kept, nothing resumed
    with open(later, "w") as f:
        json.dump({"step": 3, "norms": {}}, f)
    before = sorted(os.listdir(os.path.join(run_dir, "checkpoint-2")))
    record = "it records no freeze settings \\(grad_settings.json: a plain Trainer's checkpoint, or one saved without"
    covers = f"freezing\\), so its optimizer state covers every parameter, and this run has {now}\\."
    with pytest.raises(ChangedSettingsError, match=rf"checkpoint-2: {record} {covers}"):
        train(args_factory, resume=True, **changed)
    assert os.path.exists(later) and sorted(os.listdir(os.path.join(run_dir, "checkpoint-2"))) == before
    assert not os.path.exists(os.path.join(run_dir, "checkpoint-4", "trainer_state.json"))


@pytest.mark.parametrize("what", ["missing", "empty folder", "file", "weights only"])
def test_a_folder_that_is_no_checkpoint_gets_the_trainers_own_error(tmp_path, args_factory, what):
    """Not a checkpoint (or one without an optimizer state): nothing to compare the freeze settings with, so the
    Trainer loads what is there or says it found no checkpoint, never that the folder "was saved with" settings."""
    folder = tmp_path / "elsewhere" / "checkpoint-5"
    if what != "missing":
        folder.parent.mkdir()
        folder.write_text("") if what == "file" else folder.mkdir()
    if what == "weights only":
        tiny_classifier().save_pretrained(folder)
        check_resume_settings(folder, run_settings(args_factory(freeze_first_n_layers=1)))  # nothing to compare
        return
    with pytest.raises(ValueError, match="Can't find a valid checkpoint at"):
        train(args_factory, resume=str(folder), freeze_first_n_layers=1)


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


def test_another_global_batch_is_resumed_with_a_warning(tmp_path, caplog):
    saved = {"freeze_embeddings": True, "freeze_first_n_layers": 2, "world_size": 1, "batch": 8}
    (tmp_path / RUN_SETTINGS_FILE).write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="hf_gradtools.checkpoints"):
        check_resume_settings(tmp_path, saved)  # the same settings: nothing said
        assert caplog.records == []
        check_resume_settings(tmp_path, {**saved, "batch": 16})  # e.g. `gradient_accumulation_steps` 2 -> 4
    (message,) = [r.getMessage() for r in caplog.records]
    assert "an optimizer step takes 16 rows, where it took 8" in message
    assert "`gradient_accumulation_steps`" in message


@pytest.mark.parametrize(
    "schedule",
    [{"max_steps": 4}, {"max_steps": -1, "num_train_epochs": 1.5}],
    ids=["max_steps", "num_train_epochs"],
)
def test_resuming_a_finished_run_trains_nothing_more(args_factory, schedule, caplog):
    """The last checkpoint is at the run's last step, with batches of the epoch left (4 of 8 steps; 12 steps for
    1.5 epochs of 8): the Trainer would train one step more and save it."""

    def trainer():
        args = args_factory(
            per_device_train_batch_size=2, save_strategy="steps", save_steps=2, grad_snapshot_steps=1, **schedule
        )
        return GradTrainer(model=tiny_classifier(seed=1), args=args, train_dataset=classification_data(16))

    finished = trainer()
    finished.train()
    out, last = finished.args.output_dir, finished.state.global_step
    assert last == (4 if schedule["max_steps"] == 4 else 12)
    before = folder_contents(out)
    resumed = trainer()
    with caplog.at_level(logging.WARNING, logger="hf_gradtools"):
        output = resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == output.global_step == last
    assert folder_contents(out) == before  # no checkpoint, snapshot or file more, none rewritten otherwise
    for (name, a), b in zip(resumed.model.named_parameters(), finished.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [r.getMessage() for r in caplog.records] == [
        f"hf_gradtools: {out}{os.sep}checkpoint-{last} is at step {last}, and this run ends at step {last}: it is "
        "finished, nothing more is trained (raise `max_steps` or `num_train_epochs` to train on)."
    ]


def test_a_checkpoint_is_written_after_the_snapshots_of_its_steps(args_factory, monkeypatch):
    """The writer is still busy with step 2's snapshot when checkpoint-2 is saved: `trainer_state.json`, which makes
    the checkpoint complete, waits for it (a kill right after it must not lose a snapshot no resume writes again)."""
    state_written = threading.Event()
    on_disk_at_state = {}
    write_snapshot, save_state = snapshot_callback._write_snapshot, TrainerState.save_to_json

    def slow_write(path, step, *args):
        if step == 2:
            state_written.wait(timeout=1)  # the checkpoint would have to wait 1 s to see it
        write_snapshot(path, step, *args)

    def record_snapshots(state, json_path):
        folder = os.path.join(os.path.dirname(os.path.dirname(json_path)), "grad_snapshots")
        on_disk_at_state[os.path.basename(os.path.dirname(json_path))] = sorted(os.listdir(folder))
        state_written.set()
        save_state(state, json_path)

    monkeypatch.setattr(snapshot_callback, "_write_snapshot", slow_write)
    monkeypatch.setattr(TrainerState, "save_to_json", record_snapshots)
    train(args_factory, grad_snapshot_steps=1)
    assert on_disk_at_state == {
        "checkpoint-2": ["step-00000001.json", "step-00000002.json"],
        "checkpoint-4": [f"step-0000000{n}.json" for n in range(1, 5)],
    }


@pytest.mark.parametrize(
    "on_disk, expected",
    [((), "model.safetensors"), (("model-00001-of-00003.safetensors",), "model-00002-of-00003.safetensors")],
)
def test_a_full_disk_while_saving_the_weights_names_the_weights_file(tmp_path, on_disk, expected):
    """safetensors removes the file it could not finish and names no file: the weights file (or shard) is named."""
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    for name in ("config.json", *on_disk):
        (folder / name).write_text("{}")
    error = checkpoint_save_error(
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), folder
    )
    assert (error.errno, error.filename) == (errno.ENOSPC, str(folder / expected))
    assert str(error).startswith(f"Could not save the checkpoint {folder}: no space left for {folder / expected}")


def test_other_save_errors_are_raised_as_they_are(tmp_path):
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    # Not a lack of space: an I/O error, torch's writer on a device with room left, a permission error.
    assert checkpoint_save_error(OSError(errno.EIO, "Input/output error"), folder) is None
    assert checkpoint_save_error(RuntimeError("unexpected pos 49344 vs 49236"), folder) is None
    assert checkpoint_save_error(PermissionError(errno.EACCES, "Permission denied", str(folder)), folder) is None
    # A lack of space after the checkpoint was complete (its trainer_state.json written) is no incomplete save.
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    assert checkpoint_save_error(OSError(errno.ENOSPC, "No space left on device"), folder) is None
