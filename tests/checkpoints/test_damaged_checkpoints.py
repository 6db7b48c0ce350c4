"""A checkpoint's own records are untrusted input: a damaged one is refused, naming the file and the field, before
a resume deletes or loads anything."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil

import pytest
from safetensors.torch import save_file

from hf_gradtools import DamagedCheckpointError, GradToolsError, GradTrainer, OutsideRunFolderError
from hf_gradtools.checkpoints import RUN_SETTINGS_FILE, TRAINING_STATE_FILE, check_resume_settings, load_training_state
from tests.conftest import classification_data, folder_contents, grad_args, tiny_classifier

# Every tool that keeps state in `hf_gradtools_state.json` is on: unfreezing, noise scale, AutoClip, the guard.
RUN = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    max_steps=4,
    save_strategy="steps",
    save_steps=2,
    freeze_first_n_layers=2,
    gradual_unfreeze_steps=2,
    log_grad_noise_scale=True,
    clip_algorithm="autoclip",
    skip_nonfinite_grads=True,
    grad_snapshot_steps=1,
)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The output folder of a 4-step run: checkpoints 2 and 4, a snapshot at every step."""
    tmp = tmp_path_factory.mktemp("finished")
    trainer = GradTrainer(model=tiny_classifier(), args=grad_args(tmp, **RUN), train_dataset=classification_data(16))
    trainer.train()
    return str(tmp / "out")


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "out")
    return str(tmp_path / "out")


def edit_json(path: str, edit) -> None:
    with open(path) as f:
        data = json.load(f)
    new = edit(data)
    with open(path, "w") as f:
        f.write(new if isinstance(new, str) else json.dumps(new))


def set_field(entry: str, field: str, value):
    def edit(data):
        data[entry][field] = value
        return data

    return edit


def resume_from_checkpoint_2(run_dir: str, tmp_path):
    """Resume the run from `checkpoint-2`: a resume that goes through deletes the snapshots of steps 3 and 4."""
    args = grad_args(tmp_path, **RUN)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16))
    return trainer.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-2"))


def assert_refused_and_untouched(run_dir, tmp_path, file_name, field):
    before = folder_contents(run_dir)
    assert "grad_snapshots/step-00000004.json" in before  # what a resume from checkpoint-2 would delete
    with pytest.raises(DamagedCheckpointError) as raised:
        resume_from_checkpoint_2(run_dir, tmp_path)
    message = str(raised.value)
    assert os.path.join(run_dir, "checkpoint-2", file_name) in message
    assert field in message and "\n" not in message
    assert isinstance(raised.value, GradToolsError) and isinstance(raised.value, ValueError)
    assert folder_contents(run_dir) == before  # nothing deleted, nothing written
    return message


STATE_CASES = {
    "history-1e308": (set_field("autoclip", "history", [1e308, 0.5]), "`autoclip.history[0]` must be a non-negative"),
    "history-inf": (set_field("autoclip", "history", [0.5, math.inf]), "`autoclip.history[1]`"),
    "history-negative": (set_field("autoclip", "history", [-0.5]), "`autoclip.history[0]`"),
    "history-text": (set_field("autoclip", "history", "0.4,0.9"), "`autoclip.history` must be a list of numbers"),
    "history-missing": (lambda d: {**d, "autoclip": {}}, "`autoclip.history` is missing"),
    # AutoClip records one norm per optimizer step: 7 at `global_step` 2 is a history no run of 2 steps wrote.
    "history-longer-than-the-steps": (
        set_field("autoclip", "history", [0.5] * 7),
        "`autoclip.history` holds 7 norms, more than the 2 optimizer steps of the checkpoint (`global_step` in its "
        "trainer_state.json)",
    ),
    "guard-negative": (set_field("nonfinite_guard", "nonfinite_skips", -1), "`nonfinite_guard.nonfinite_skips`"),
    "guard-inf": (set_field("nonfinite_guard", "nonfinite_skips", math.inf), "got inf"),
    "guard-float": (set_field("nonfinite_guard", "consecutive", 1.0), "`nonfinite_guard.consecutive`"),
    "guard-bool": (set_field("nonfinite_guard", "nonfinite_skips", True), "`nonfinite_guard.nonfinite_skips`"),
    "guard-run-longer-than-all": (
        lambda d: {**d, "nonfinite_guard": {"nonfinite_skips": 1, "consecutive": 2, "first_skipped_step": 1}},
        "`nonfinite_guard.consecutive` must be at most `nonfinite_skips`=1, got 2",
    ),
    "guard-first-step-without-run": (
        set_field("nonfinite_guard", "first_skipped_step", 3),
        "`nonfinite_guard.first_skipped_step` must be null exactly when `consecutive` is 0",
    ),
    "unfreezer-position-beyond-plan": (
        set_field("unfreezer", "position", 3),
        "`unfreezer.position` must be an integer from 0 to 2, got 3",
    ),
    "unfreezer-labels": (set_field("unfreezer", "labels", ["layer.1", 0]), "`unfreezer.labels[1]`"),
    "unfreezer-interval": (set_field("unfreezer", "every_n_steps", 0), "`unfreezer.every_n_steps`"),
    "noise-nan": (set_field("noise_scale", "grad_sq_norm_ema", math.nan), "`noise_scale.grad_sq_norm_ema`"),
    "noise-beta": (set_field("noise_scale", "beta", 1.5), "`noise_scale.beta` must be a number in [0, 1)"),
    "noise-steps": (set_field("noise_scale", "steps", 2.5), "`noise_scale.steps`"),
    "unknown-entry": (
        lambda d: {**d, "optimizer_extra": {}},
        "`optimizer_extra` is the state of a component this run does not have",
    ),
    "unknown-field": (set_field("autoclip", "percentile", 10), "`autoclip.percentile` is not a field"),
    "entry-not-object": (lambda d: {**d, "autoclip": [0.4]}, "`autoclip` must be a JSON object"),
    "a-number": (lambda d: "3", "it must be a JSON object, got 3"),
    "a-list": (lambda d: [d], "it must be a JSON object, got [{"),
    "cut-off": (lambda d: json.dumps(d)[:40], "cannot be read (JSONDecodeError"),
    "empty": (lambda d: "", "cannot be read (JSONDecodeError"),
}


def test_unreadable_state_file_is_refused(run_copy, tmp_path):
    path = os.path.join(run_copy, "checkpoint-2", TRAINING_STATE_FILE)
    with open(path, "wb") as f:
        f.write(b'{"autoclip": {"history": [\xff\xfe]}}')  # not UTF-8
    assert_refused_and_untouched(run_copy, tmp_path, TRAINING_STATE_FILE, "cannot be read (UnicodeDecodeError")
    os.remove(path)
    os.mkdir(path)  # a folder where the file should be
    assert_refused_and_untouched(run_copy, tmp_path, TRAINING_STATE_FILE, "is not a regular file (a folder, pipe")


SETTINGS_CASES = {
    "a-list": (lambda d: [d], "it must be a JSON object, got [{"),
    "world-size-text": (
        lambda d: {**d, "world_size": "2"},
        "`world_size` must be an integer from 1 to 1048576, got '2'",
    ),
    "other-layout": (lambda d: {"settings": d}, "`freeze_embeddings` is missing"),
    "freeze-missing": (lambda d: {k: v for k, v in d.items() if k != "freeze_first_n_layers"}, "is missing"),
    "layers-text": (lambda d: {**d, "freeze_first_n_layers": "2"}, "`freeze_first_n_layers` must be a non-negative"),
    "layers-negative": (lambda d: {**d, "freeze_first_n_layers": -2}, "`freeze_first_n_layers`"),
    "embeddings-number": (lambda d: {**d, "freeze_embeddings": 0}, "`freeze_embeddings` must be true or false"),
    "batch-zero": (lambda d: {**d, "batch": 0}, "`batch` must be an integer of at least 1, got 0"),
    "world-size-huge": (
        lambda d: {**d, "world_size": 10**29},
        "`world_size` must be an integer from 1 to 1048576, got 100000000000000000000000000000",
    ),
    "batch-not-a-multiple-of-world-size": (
        lambda d: {**d, "world_size": 3, "batch": 4},
        "`batch` must be a multiple of `world_size`=3 (per-device batch x accumulation x processes), got 4",
    ),
    "unknown-field": (lambda d: {**d, "lr": 0.1}, "`lr` is not a field of this state"),
    "cut-off": (lambda d: json.dumps(d)[:20], "cannot be read (JSONDecodeError"),
    "empty": (lambda d: "", "cannot be read (JSONDecodeError"),
}


CASES = [(TRAINING_STATE_FILE, case) for case in STATE_CASES] + [(RUN_SETTINGS_FILE, case) for case in SETTINGS_CASES]


@pytest.mark.parametrize("file_name, case", CASES, ids=[f"{file}:{case}" for file, case in CASES])
def test_damaged_record_is_refused_before_anything_changes(run_copy, tmp_path, file_name, case):
    edit, field = (STATE_CASES if file_name == TRAINING_STATE_FILE else SETTINGS_CASES)[case]
    edit_json(os.path.join(run_copy, "checkpoint-2", file_name), edit)
    assert_refused_and_untouched(run_copy, tmp_path, file_name, field)


def test_damaged_settings_with_other_world_size_reach_no_log_line(tmp_path):
    (tmp_path / RUN_SETTINGS_FILE).write_text(
        json.dumps({"freeze_embeddings": False, "freeze_first_n_layers": 0, "world_size": "2", "batch": 4})
    )
    settings = {"freeze_embeddings": False, "freeze_first_n_layers": 0, "world_size": 1, "batch": 4}
    with pytest.raises(DamagedCheckpointError, match=r"grad_settings.json is damaged .*`world_size`"):
        check_resume_settings(tmp_path, settings)
    # A missing record is a plain Trainer's checkpoint, compared as saved with the default freeze settings.
    os.remove(tmp_path / RUN_SETTINGS_FILE)
    check_resume_settings(tmp_path, settings)


def test_a_sound_state_file_resumes_and_its_values_are_restored(run_copy, tmp_path):
    # NaN in AutoClip's history is what the package writes for a step whose norm was not finite.
    path = os.path.join(run_copy, "checkpoint-2", TRAINING_STATE_FILE)
    edit_json(path, set_field("autoclip", "history", [0.4324490427970886, math.nan]))
    state = load_training_state(os.path.join(run_copy, "checkpoint-2"))
    assert state["unfreezer"] == {"position": 1, "every_n_steps": 2, "labels": ["layer.1", "layer.0"]}
    assert state["nonfinite_guard"] == {"nonfinite_skips": 0, "consecutive": 0, "first_skipped_step": None}
    assert state["autoclip"]["history"][0] == 0.4324490427970886 and math.isnan(state["autoclip"]["history"][1])
    assert state["noise_scale"]["steps"] == 2
    output = resume_from_checkpoint_2(run_copy, tmp_path)
    assert output.global_step == 4
    assert load_training_state(os.path.join(run_copy, "checkpoint-4"))["unfreezer"]["position"] == 2
    assert load_training_state(tmp_path) == {}  # a folder without the file: nothing to restore


def test_autoclip_history_as_long_as_the_steps_taken_is_accepted(run_copy):
    # What the package writes: one norm per optimizer step (here 2), NaN for a non-finite one; a shorter history is
    # a run that switched AutoClip on when it resumed.
    checkpoint = os.path.join(run_copy, "checkpoint-2")
    assert len(load_training_state(checkpoint)["autoclip"]["history"]) == 2
    edit_json(os.path.join(checkpoint, TRAINING_STATE_FILE), set_field("autoclip", "history", [0.5]))
    assert load_training_state(checkpoint)["autoclip"]["history"] == [0.5]
    edit_json(os.path.join(checkpoint, TRAINING_STATE_FILE), set_field("autoclip", "history", [0.5, 0.4, 0.3]))
    with pytest.raises(DamagedCheckpointError, match=r"`autoclip.history` holds 3 norms, more than the 2 optimizer"):
        load_training_state(checkpoint)


def test_a_step_out_of_range_is_refused_before_anything_changes(run_copy, tmp_path):
    path = os.path.join(run_copy, "checkpoint-2", "trainer_state.json")
    edit_json(path, lambda d: {**d, "global_step": 10**400})
    assert_refused_and_untouched(run_copy, tmp_path, "trainer_state.json", "`global_step` is 1000")


@pytest.mark.parametrize(
    ("field", "value"),
    [("log_history", 5), ("log_history", [1, 2]), ("epoch", "1"), ("max_steps", -3), ("stateful_callbacks", [])],
)
def test_a_damaged_trainer_state_field_is_refused_before_anything_changes(run_copy, tmp_path, field, value):
    path = os.path.join(run_copy, "checkpoint-2", "trainer_state.json")
    edit_json(path, lambda d: {**d, field: value})
    assert_refused_and_untouched(run_copy, tmp_path, "trainer_state.json", f"`{field}` is {value!r}, not")


@pytest.mark.parametrize("file_name", [RUN_SETTINGS_FILE, TRAINING_STATE_FILE])
def test_a_record_linked_out_of_its_checkpoint_is_not_read(run_copy, tmp_path, file_name):
    record = os.path.join(run_copy, "checkpoint-2", file_name)
    outside = tmp_path / f"outside-{file_name}"
    shutil.move(record, outside)  # a sound record, but elsewhere
    os.symlink(outside, record)
    before, kept = folder_contents(run_copy), outside.read_bytes()
    with pytest.raises(OutsideRunFolderError) as raised:
        resume_from_checkpoint_2(run_copy, tmp_path / "resumed")
    assert record in str(raised.value) and str(outside) in str(raised.value)
    assert folder_contents(run_copy) == before and outside.read_bytes() == kept


@pytest.mark.parametrize(
    "missing", [["optimizer.pt"], ["scheduler.pt"], ["optimizer.pt", "scheduler.pt"], ["rng_state.pth"]]
)
def test_a_checkpoint_without_optimizer_or_scheduler_state_resumes_with_a_warning(run_copy, tmp_path, caplog, missing):
    for name in missing:
        os.remove(os.path.join(run_copy, "checkpoint-2", name))
    with caplog.at_level(logging.WARNING, logger="hf_gradtools"):
        resume_from_checkpoint_2(run_copy, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "afresh, so the resumed run" in r.getMessage()]
    assert len(warnings) == 1 and all(name in warnings[0] for name in missing)
    assert ("optimizer.pt" in warnings[0]) == ("optimizer.pt" in missing)


def cut_in_half(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def overwrite_with_zeros(path: str) -> None:
    with open(path, "wb") as f:
        f.write(bytes(4096))  # what a power loss can leave of a file


def garble_config(path: str) -> None:
    with open(path, "w") as f:
        f.write('{"model_type": "bert",')


DAMAGE = {
    "model.safetensors-cut": ("model.safetensors", cut_in_half, "is damaged (cut off: "),
    "optimizer.pt-cut": ("optimizer.pt", cut_in_half, "is damaged (cut off: "),
    "scheduler.pt-cut": ("scheduler.pt", cut_in_half, "is damaged (cut off: "),
    "rng_state.pth-cut": ("rng_state.pth", cut_in_half, "is damaged (cut off: "),
    "optimizer.pt-zeros": ("optimizer.pt", overwrite_with_zeros, "is damaged (not a torch file: it starts as neither"),
    "model.safetensors-zeros": (
        "model.safetensors",
        overwrite_with_zeros,
        "is damaged (its safetensors header is not JSON)",
    ),
    "config.json-cut": ("config.json", garble_config, "is damaged (not JSON (JSONDecodeError"),
    "model.safetensors-empty": (
        "model.safetensors",
        lambda path: save_file({}, path),  # a whole file of no tensors: the model would keep its fresh weights
        "is damaged (it holds no tensors",
    ),
    "trainer_state.json-cut": (
        "trainer_state.json",
        lambda path: cut_in_half(path),
        "trainer_state.json is unreadable (JSONDecodeError",
    ),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_file_the_resume_loads_is_refused_by_name_before_anything_changes(run_copy, tmp_path, case):
    file_name, damage, reason = DAMAGE[case]
    damage(os.path.join(run_copy, "checkpoint-2", file_name))
    message = assert_refused_and_untouched(run_copy, tmp_path, file_name, reason)
    assert "`resume_from_checkpoint=True`" in message


def resume_true(run_dir: str, tmp_path, caplog) -> tuple[GradTrainer, list[logging.LogRecord]]:
    args = grad_args(tmp_path, **{**RUN, "max_steps": 6})
    args.output_dir = run_dir
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        trainer.train(resume_from_checkpoint=True)
    return trainer, [r for r in caplog.records if r.getMessage().startswith("Skipping incomplete checkpoint")]


def test_resume_true_passes_over_a_damaged_checkpoint_with_a_warning(run_copy, tmp_path, caplog):
    cut_in_half(os.path.join(run_copy, "checkpoint-4", "optimizer.pt"))
    trainer, skipped = resume_true(run_copy, tmp_path, caplog)
    assert trainer.resumed_checkpoint == os.path.join(run_copy, "checkpoint-2")
    assert trainer.state.global_step == 6
    assert [r.levelno for r in skipped] == [logging.WARNING]
    assert "optimizer.pt is damaged (cut off: " in skipped[0].getMessage()


def test_a_damaged_file_the_new_save_does_not_write_is_deleted_with_the_earlier_save(run_copy, tmp_path, caplog):
    """A stale damaged file (a scaler a CPU run never writes) would otherwise mark the new save damaged for good."""
    stale = os.path.join(run_copy, "checkpoint-4", "scaler.pt")
    with open(stale, "wb") as f:
        f.write(b"PK\x03\x04 cut")
    trainer, skipped = resume_true(run_copy, tmp_path, caplog)
    assert trainer.resumed_checkpoint == os.path.join(run_copy, "checkpoint-2")
    assert not os.path.exists(stale)  # the new checkpoint-4 is whole
    trainer, skipped = resume_true(run_copy, tmp_path, caplog)
    assert trainer.resumed_checkpoint == os.path.join(run_copy, "checkpoint-6") and skipped == []


def test_a_checkpoint_linked_inside_the_run_folder_is_checked_through_the_link(run_copy, tmp_path, caplog):
    store = os.path.join(run_copy, "store")
    os.mkdir(store)
    os.rename(os.path.join(run_copy, "checkpoint-4"), os.path.join(store, "checkpoint-4"))
    os.symlink(os.path.join("store", "checkpoint-4"), os.path.join(run_copy, "checkpoint-4"))
    cut_in_half(os.path.join(store, "checkpoint-4", "model.safetensors"))
    trainer, skipped = resume_true(run_copy, tmp_path, caplog)
    assert trainer.resumed_checkpoint == os.path.join(run_copy, "checkpoint-2")
    assert "model.safetensors is damaged (cut off: " in skipped[0].getMessage()


@pytest.mark.parametrize("file_name", ["trainer_state.json", TRAINING_STATE_FILE, RUN_SETTINGS_FILE])
def test_a_pipe_where_a_record_should_be_is_refused_without_reading_it(run_copy, tmp_path, file_name):
    path = os.path.join(run_copy, "checkpoint-2", file_name)
    os.remove(path)
    os.mkfifo(path)  # opening it to read would wait for a writer for good
    assert_refused_and_untouched(run_copy, tmp_path, file_name, "is not a regular file (a folder, pipe or device)")


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: {**d, "best_model_checkpoint": "/tmp"}, "`best_model_checkpoint` is '/tmp', not a checkpoint of"),
        (lambda d: {**d, "best_model_checkpoint": 3}, "`best_model_checkpoint` is 3, not a checkpoint of"),
        (lambda d: {**d, "field_of_another_version": 1}, "`field_of_another_version` is not a field of this"),
        (lambda d: {**d, "global_step": 3}, "trainer_state.json is of step 3, not of the folder's step 2"),
    ],
    ids=["best-outside", "best-number", "unknown-field", "other-step"],
)
def test_trainer_state_fields_that_would_mislead_the_trainer_are_refused(run_copy, tmp_path, edit, field):
    """A best checkpoint elsewhere would be loaded at the end (`load_best_model_at_end`) and kept by the rotation in
    place of this run's; a field this transformers does not know fails `TrainerState`; a copy under another
    step's name would resume at the wrong step."""
    edit_json(os.path.join(run_copy, "checkpoint-2", "trainer_state.json"), edit)
    assert_refused_and_untouched(run_copy, tmp_path, "trainer_state.json", field)


@pytest.mark.parametrize("entry", ["file", "dangling link out", "link out"])
def test_a_checkpoint_entry_that_would_fail_a_later_save_is_refused_before_training(run_copy, tmp_path, entry):
    """A file where a checkpoint folder is saved, or a link out of the run folder (dangling too), is refused when
    training starts, before `True` reads a checkpoint or deletes a snapshot: not at the save that meets it."""
    where = os.path.join(run_copy, "checkpoint-6")
    if entry == "file":
        open(where, "w").close()
    else:
        os.symlink(str(tmp_path / ("nothing" if entry == "dangling link out" else "")), where)
    before = folder_contents(run_copy)
    error = DamagedCheckpointError if entry == "file" else OutsideRunFolderError
    with pytest.raises(error, match="checkpoint-6"):
        GradTrainer(
            model=tiny_classifier(),
            args=grad_args(tmp_path, **{**RUN, "max_steps": 8}),
            train_dataset=classification_data(16),
        ).train(resume_from_checkpoint=True)
    assert folder_contents(run_copy) == before


def test_a_save_replaces_links_rather_than_writing_through_them(run_copy, tmp_path):
    """checkpoint-4 saved again by a run resumed from checkpoint-2: its optimizer state, a hard link to a file
    outside the run, and its scheduler state, a symbolic link to checkpoint-2's, get files of their own."""
    folder, earlier = os.path.join(run_copy, "checkpoint-4"), os.path.join(run_copy, "checkpoint-2")
    outside = tmp_path / "outside-optimizer.pt"
    shutil.copy(os.path.join(folder, "optimizer.pt"), outside)
    os.remove(os.path.join(folder, "optimizer.pt"))
    os.link(outside, os.path.join(folder, "optimizer.pt"))
    os.remove(os.path.join(folder, "scheduler.pt"))
    os.symlink(os.path.join("..", "checkpoint-2", "scheduler.pt"), os.path.join(folder, "scheduler.pt"))
    kept = outside.read_bytes(), open(os.path.join(earlier, "scheduler.pt"), "rb").read()
    resume_from_checkpoint_2(run_copy, tmp_path)
    assert (outside.read_bytes(), open(os.path.join(earlier, "scheduler.pt"), "rb").read()) == kept
    assert not os.path.islink(os.path.join(folder, "scheduler.pt"))
    assert os.stat(os.path.join(folder, "optimizer.pt")).st_nlink == 1


def test_a_save_into_a_folder_passed_over_for_a_pipe_does_not_block(run_copy, tmp_path, caplog):
    """`True` passes checkpoint-4 over (its optimizer state is a pipe); the save of step 4 replaces the pipe."""
    path = os.path.join(run_copy, "checkpoint-4", "optimizer.pt")
    os.remove(path)
    os.mkfifo(path)
    trainer, skipped = resume_true(run_copy, tmp_path, caplog)
    assert trainer.resumed_checkpoint == os.path.join(run_copy, "checkpoint-2")
    assert "optimizer.pt is damaged (not a regular file" in skipped[0].getMessage()
    assert os.path.isfile(path)


def test_resume_true_passes_over_a_copy_under_another_steps_name_with_a_warning(run_copy, tmp_path, caplog):
    """A finished save whose step is not its folder's is not a save cut short: passed over with a WARNING."""
    shutil.copytree(os.path.join(run_copy, "checkpoint-2"), os.path.join(run_copy, "checkpoint-6"))
    trainer, skipped = resume_true(run_copy, tmp_path, caplog)
    assert trainer.resumed_checkpoint == os.path.join(run_copy, "checkpoint-4")
    assert [r.levelno for r in skipped] == [logging.WARNING]
    assert "trainer_state.json is of step 2, not of the folder's step 6" in skipped[0].getMessage()
