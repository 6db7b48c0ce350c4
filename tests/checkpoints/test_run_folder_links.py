"""A run folder is untrusted input: no write, delete or read follows a symbolic link out of it.

Each case plants a link in a run folder pointing at a file or folder outside it, runs what would follow it
(plotting, resuming, pruning, training, loading), and checks that the outside is byte-for-byte as it was and that
the refusal names the path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers as T

from hf_gradtools import GradSnapshotCallback, GradTrainer, load_grad_snapshots, load_grad_tensors
from hf_gradtools.cli import main
from hf_gradtools.run_folder import OutsideRunFolderError, inside_run_folder, read_run_file
from hf_gradtools.snapshots import DamagedSnapshotError, discard_grad_snapshots_after, prune_grad_snapshots
from hf_gradtools.snapshots.tensors import GradTensorCopy
from tests.conftest import classification_data, folder_contents, tiny_classifier


def snapshot(step: int, norm: float = 1.0) -> dict:
    return {"step": step, "norm_type": 2.0, "total_norm_pre_clip": norm, "total_norm_post_clip": norm,
            "norms": {"enc.layer.0.w": norm, "head.w": norm}}  # fmt: skip


@pytest.fixture
def run(tmp_path):
    """A hand-written run folder: `frozen_parameters.json`, snapshots of steps 1 to 3, tensors at step 2."""
    folder = tmp_path / "run"
    (folder / "grad_snapshots").mkdir(parents=True)
    description = {"frozen": [], "trainable": ["enc.layer.0.w", "head.w"], "num_frozen": 0, "num_trainable": 4,
                   "layer_stack": "enc.layer", "embeddings": []}  # fmt: skip
    (folder / "frozen_parameters.json").write_text(json.dumps(description))
    for step in (1, 2, 3):
        (folder / "grad_snapshots" / f"step-{step:08d}.json").write_text(json.dumps(snapshot(step)))
    GradTensorCopy(2, {"head.w": torch.tensor([1.0, -2.0])}).write_to_run(folder)
    return folder


@pytest.fixture
def outside(tmp_path):
    """A folder outside the run holding a file of the user's and snapshot-like files that must survive."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "precious.txt").write_bytes(b"the user's own file\n")
    for step in (5, 6, 7):
        (folder / f"step-{step:08d}.json").write_text(json.dumps(snapshot(step, norm=12345.0)))
        (folder / f"step-{step:08d}.safetensors").write_bytes(b"not ours")
    return folder


def link_snapshot_folder_out(run, outside) -> None:
    for name in os.listdir(run / "grad_snapshots"):
        os.remove(run / "grad_snapshots" / name)
    os.rmdir(run / "grad_snapshots")
    os.symlink(outside, run / "grad_snapshots")


# ---- writes ----


@pytest.mark.parametrize("png", ["grad_norms.png", "grad_noise_scale.png", "grad_hist_step-00000002_head.w.png"])
def test_plot_replaces_a_linked_png_and_leaves_its_target_alone(run, outside, capsys, png):
    history = [{"step": 1, "grad_noise_scale": 5.0}, {"step": 2, "grad_noise_scale": 7.0}]
    (run / "trainer_state.json").write_text(json.dumps({"train_batch_size": 2, "log_history": history}))
    os.symlink(outside / "precious.txt", run / png)
    before = folder_contents(outside)
    command = ["hist", str(run), "--param", "head.w"] if png.startswith("grad_hist") else ["plot", str(run)]
    assert main(command) == 0
    assert folder_contents(outside) == before
    assert not os.path.islink(run / png) and (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {run / png}" in capsys.readouterr().out.splitlines()


def test_resume_refuses_a_snapshot_folder_linked_out_and_deletes_nothing(args_factory, outside, single_thread):
    args = args_factory(per_device_train_batch_size=2, save_strategy="steps", save_steps=2, max_steps=4,
                        grad_snapshot_steps=1)  # fmt: skip
    GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16)).train()
    run = args.output_dir
    link_snapshot_folder_out(Path(run), outside)
    before = folder_contents(outside)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16))
    with pytest.raises(OutsideRunFolderError, match=rf"'{os.path.join(run, 'grad_snapshots')}' leads out of"):
        trainer.train(resume_from_checkpoint=os.path.join(run, "checkpoint-2"))
    assert folder_contents(outside) == before  # steps 5 to 7 are after checkpoint-2: the old code deleted them


def test_pruning_and_discarding_refuse_a_snapshot_folder_linked_out(run, outside):
    link_snapshot_folder_out(run, outside)
    before = folder_contents(outside)
    for call in (
        lambda: prune_grad_snapshots(run, keep=1),
        lambda: prune_grad_snapshots(run / "grad_snapshots", keep=1),  # as the writer thread calls it
        lambda: discard_grad_snapshots_after(run / "grad_snapshots", 0),  # as a resume calls it
    ):
        with pytest.raises(OutsideRunFolderError, match="grad_snapshots' leads out of the run folder"):
            call()
    assert folder_contents(outside) == before


def test_pruning_removes_a_linked_snapshot_file_itself_not_its_target(run, outside):
    os.symlink(outside / "step-00000005.json", run / "grad_snapshots" / "step-00000000.json")
    before = folder_contents(outside)
    removed = prune_grad_snapshots(run, keep=1)
    assert os.path.join(run, "grad_snapshots", "step-00000000.json") in removed
    assert folder_contents(outside) == before


def test_training_refuses_a_snapshot_folder_linked_out_before_any_step(args_factory, outside, single_thread):
    args = args_factory(grad_snapshot_steps=1, grad_snapshot_total_limit=1)
    os.makedirs(args.output_dir)
    os.symlink(outside, os.path.join(args.output_dir, "grad_snapshots"))
    before = folder_contents(outside)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(12))
    with pytest.raises(OutsideRunFolderError, match="grad_snapshots' leads out of the run folder"):
        trainer.train()
    assert trainer.state.global_step == 0 and folder_contents(outside) == before
    assert sorted(os.listdir(args.output_dir)) == ["grad_snapshots"]  # not even frozen_parameters.json


def test_a_named_folder_linked_to_another_callbacks_folder_is_refused(args_factory, single_thread):
    """Two callbacks writing one folder through a link would prune each other's snapshots."""
    args = args_factory(grad_snapshot_steps=1, max_steps=1)
    os.makedirs(os.path.join(args.output_dir, "grad_snapshots"))
    os.symlink("grad_snapshots", os.path.join(args.output_dir, "grad_snapshots_l1"))
    callbacks = [GradSnapshotCallback(), GradSnapshotCallback(norm_type=1.0, name="l1")]
    trainer = GradTrainer(
        model=tiny_classifier(), args=args, train_dataset=classification_data(4), callbacks=callbacks
    )
    with pytest.raises(ValueError, match="Two GradSnapshotCallbacks would write the same snapshots"):
        trainer.train()


# ---- reads ----


def test_a_snapshot_file_linked_out_is_not_read(run, outside, caplog, capsys):
    linked = run / "grad_snapshots" / "step-00000004.json"
    os.symlink(outside / "step-00000005.json", linked)
    snapshots = load_grad_snapshots(run)
    assert [s["step"] for s in snapshots] == [1, 2, 3]
    assert list(snapshots.skipped) == [str(linked)]
    assert "a link out of the run folder" in snapshots.skipped[str(linked)]
    with pytest.raises(DamagedSnapshotError, match="step-00000004.json: a link out of the run folder"):
        load_grad_snapshots(run, strict=True)
    assert main(["summary", str(run)]) == 0
    out = capsys.readouterr().out
    assert "12345" not in out and "steps 1 to 3" in out  # the outside file's norms are not shown


def test_a_snapshot_folder_linked_out_is_not_read(run, outside, capsys):
    link_snapshot_folder_out(run, outside)
    with pytest.raises(OutsideRunFolderError, match="grad_snapshots' leads out of the run folder"):
        load_grad_snapshots(run)
    for command in (["summary", str(run)], ["plot", str(run)], ["hist", str(run), "--param", "head.w"]):
        assert main(command) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "grad_snapshots' leads out of the run folder" in err[0], command


def test_a_tensor_file_linked_out_is_not_read(run, tmp_path, capsys):
    foreign = tmp_path / "foreign.safetensors"
    GradTensorCopy(4, {"head.w": torch.tensor([99.0, 99.0])}).write(foreign)
    os.symlink(foreign, run / "grad_snapshots" / "step-00000004.safetensors")
    with pytest.raises(OutsideRunFolderError, match="step-00000004.safetensors' leads out of the run folder"):
        load_grad_tensors(run, step=4)
    with pytest.raises(OutsideRunFolderError):
        load_grad_snapshots(run).tensors(4)
    assert main(["hist", str(run), "--param", "head.w"]) == 1  # the last step with tensors is the linked one
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-00000004.safetensors' leads out of the run folder" in err[0]
    assert load_grad_tensors(run, step=2)["head.w"].tolist() == [1.0, -2.0]


@pytest.mark.parametrize("name", ["frozen_parameters.json", "trainer_state.json", "all_results.json"])
def test_a_run_file_linked_out_is_not_read(run, tmp_path, capsys, name):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"secret": 1}))
    if (run / name).exists():
        os.remove(run / name)
    os.symlink(foreign, run / name)
    assert main(["summary" if name != "trainer_state.json" else "plot", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{name}' leads out of the run folder" in err[0] and "secret" not in err[0]


def test_links_that_stay_inside_are_followed(run):
    os.symlink("step-00000003.json", run / "grad_snapshots" / "step-00000004.json")
    assert [s["step"] for s in load_grad_snapshots(run, strict=True)] == [1, 2, 3, 3]
    assert inside_run_folder(run, run / "grad_snapshots" / "step-00000004.json")
    assert read_run_file(run, run / "grad_snapshots" / "step-00000004.json").startswith(b'{"step": 3')


def test_discarding_removes_a_linked_snapshot_file_itself_not_its_target(run, outside):
    # As a resume from step 3 does: the link of a later step is deleted itself, the file it points to stays.
    linked = run / "grad_snapshots" / "step-00000009.json"
    os.symlink(outside / "step-00000005.json", linked)
    before = folder_contents(outside)
    assert str(linked) in discard_grad_snapshots_after(run, 3)
    assert not os.path.lexists(linked) and folder_contents(outside) == before


# ---- checkpoints ----


def saved_run(args_factory):
    args = args_factory(per_device_train_batch_size=2, save_strategy="steps", save_steps=2, max_steps=4)
    GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16)).train()
    return args


@pytest.mark.parametrize("name", ["trainer_state.json", "optimizer.pt", "model.safetensors"])
@pytest.mark.parametrize("how", ["last", "named"])
def test_resume_refuses_a_checkpoint_file_linked_out(args_factory, tmp_path, single_thread, name, how):
    args = saved_run(args_factory)
    checkpoint = os.path.join(args.output_dir, "checkpoint-4")
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir()
    os.replace(os.path.join(checkpoint, name), target)
    os.symlink(target, os.path.join(checkpoint, name))
    before = folder_contents(args.output_dir)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16))
    with pytest.raises(OutsideRunFolderError, match=rf"checkpoint-4/{name}' leads out of the run folder"):
        trainer.train(resume_from_checkpoint=True if how == "last" else checkpoint)
    assert folder_contents(args.output_dir) == before


def test_a_checkpoint_folder_linked_out_is_neither_resumed_nor_saved_through(args_factory, tmp_path, single_thread):
    args = saved_run(args_factory)
    checkpoint = os.path.join(args.output_dir, "checkpoint-4")
    os.replace(checkpoint, tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", checkpoint)
    before = folder_contents(tmp_path / "elsewhere")
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16))
    with pytest.raises(OutsideRunFolderError, match=r"checkpoint-4' leads out of the run folder"):
        trainer.train(resume_from_checkpoint=True)
    # A fresh run, which would save step 4 again, is refused before its first step, not at that save.
    steps = []
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16))
    trainer.add_callback(type("Steps", (T.TrainerCallback,), {"on_step_end": lambda *a, **k: steps.append(1)})())
    with pytest.raises(OutsideRunFolderError, match=r"checkpoint-4' leads out of the run folder"):
        trainer.train()
    assert steps == [] and folder_contents(tmp_path / "elsewhere") == before


class LinkCheckpointOut(T.TrainerCallback):
    """At step 3, links `checkpoint-4` (not saved yet) to a folder outside the run."""

    def __init__(self, target):
        self.target = target

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.symlink(self.target, os.path.join(args.output_dir, "checkpoint-4"))


def test_a_save_does_not_write_through_a_checkpoint_folder_linked_out_during_the_run(
    args_factory, tmp_path, single_thread
):
    (tmp_path / "elsewhere").mkdir()
    args = args_factory(per_device_train_batch_size=2, save_strategy="steps", save_steps=2, max_steps=4)
    trainer = GradTrainer(
        model=tiny_classifier(), args=args, train_dataset=classification_data(16),
        callbacks=[LinkCheckpointOut(tmp_path / "elsewhere")],
    )  # fmt: skip
    with pytest.raises(OutsideRunFolderError, match=r"checkpoint-4' leads out of the run folder"):
        trainer.train()
    assert os.listdir(tmp_path / "elsewhere") == [] and trainer.state.global_step == 4
