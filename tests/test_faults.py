"""Faults during training: a SIGKILL in the middle of a snapshot write and a checkpoint save, a full disk and an
unwritable folder. Every finished snapshot stays readable, no temporary file is left where it could be mistaken
for data, and the run resumes from its last complete checkpoint to the same weights as a run never interrupted."""

from __future__ import annotations

import builtins
import errno
import glob
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hf_gradtools import atomic, load_grad_snapshots
from hf_gradtools.checkpoints import checkpoint_problem, last_complete_checkpoint

WORKER = os.path.join(os.path.dirname(__file__), "helpers", "fault_train.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_worker():
    spec = importlib.util.spec_from_file_location("fault_train", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def temporary_files(folder) -> list[str]:
    return glob.glob(os.path.join(folder, "**", "*.tmp"), recursive=True) + glob.glob(
        os.path.join(folder, "**", ".*.tmp"), recursive=True
    )


def assert_same_run(resumed_dir: str, reference, model) -> None:
    """Snapshots of every step, once each, and the final weights equal those of the uninterrupted reference."""
    resumed, expected = load_grad_snapshots(resumed_dir, strict=True), load_grad_snapshots(reference.args.output_dir)
    assert [s["step"] for s in resumed] == list(range(1, 9)) == [s["step"] for s in expected]
    for a, b in zip(resumed, expected, strict=True):
        assert a["norms"] == pytest.approx(b["norms"], rel=1e-5, abs=1e-9), a["step"]
        assert a["total_norm_pre_clip"] == pytest.approx(b["total_norm_pre_clip"], rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    trainer = load_worker().make_trainer(str(tmp_path_factory.mktemp("reference") / "out"))
    trainer.train()
    return trainer


def kill_when_hanging(tmp_path, where: str, waits_for: tuple[str, ...]) -> str:
    """Run the worker until it hangs where asked, SIGKILL it, and return its output_dir."""
    out, signals = str(tmp_path / "out"), tmp_path / "signals"
    signals.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen(
        [sys.executable, WORKER, out, str(signals), where],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not all((signals / name).exists() for name in waits_for):
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline, f"the training process never hung at {waits_for}"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    return out


def test_sigkill_mid_snapshot_write_and_mid_save_then_resume(tmp_path, reference, caplog):
    out = kill_when_hanging(tmp_path, "writes", ("snapshot", "save"))
    # What the kill left: a half-written temporary snapshot file and a checkpoint-6 without its trainer state.
    folder = os.path.join(out, "grad_snapshots")
    (tmp,) = temporary_files(folder)
    assert os.path.basename(tmp).startswith(".step-00000006.json.")
    assert checkpoint_problem(os.path.join(out, "checkpoint-6")) == "no trainer_state.json (the save did not finish)"
    snapshots = load_grad_snapshots(out, strict=True)  # every finished snapshot, nothing in the way
    assert [s["step"] for s in snapshots] == [1, 2, 3, 4, 5]
    assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-4")

    trainer = load_worker().make_trainer(out)
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 8
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"Skipping incomplete checkpoint {out}{os.sep}checkpoint-6") for m in messages)
    # Step 5 is done again after resuming: its snapshot from the killed run went first.
    assert (
        f"hf_gradtools: resuming from step 4; deleted the 1 snapshot file(s) of later steps in {folder}." in messages
    )
    assert checkpoint_problem(os.path.join(out, "checkpoint-6")) is None  # saved again, completely this time
    assert_same_run(out, reference, trainer.model)


def test_sigkill_mid_step_then_resume(tmp_path, reference):
    out = kill_when_hanging(tmp_path, "step", ("step",))
    assert temporary_files(out) == []
    assert [s["step"] for s in load_grad_snapshots(out, strict=True)] == [1, 2, 3, 4, 5, 6]
    assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-6")
    trainer = load_worker().make_trainer(out)
    trainer.train(resume_from_checkpoint=True)
    assert_same_run(out, reference, trainer.model)


def failing_open(fail_from_step: int, error: int):
    """`open` for hf_gradtools.atomic that fails for snapshots of `fail_from_step` on: ENOSPC part-way through the
    write (the temporary file exists by then), EACCES when creating the temporary file (a read-only folder)."""

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            self.file.write(text[:10])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_open(path, *args, **kwargs):
        name = os.path.basename(os.fspath(path))
        failing = name.startswith(".step-") and int(name[6:14]) >= fail_from_step
        if failing and error == errno.EACCES:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        file = builtins.open(path, *args, **kwargs)
        return FullDisk(file) if failing else file

    return fake_open


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES], ids=["disk-full", "read-only-folder"])
def test_failed_snapshot_write_stops_training_and_keeps_the_checkpoints(tmp_path, monkeypatch, reference, error):
    worker = load_worker()
    out = str(tmp_path / "out")
    trainer = worker.make_trainer(out)
    monkeypatch.setattr(atomic, "open", failing_open(3, error), raising=False)
    with pytest.raises(OSError) as raised:
        trainer.train()
    assert raised.value.errno == error
    assert "step-00000003.json" in str(raised.value)  # says which file could not be written
    assert trainer.state.global_step <= 4  # stopped at the next step (or the checkpoint right after it)
    assert temporary_files(out) == []
    assert [s["step"] for s in load_grad_snapshots(out, strict=True)] == [1, 2]
    assert last_complete_checkpoint(out) in {os.path.join(out, f"checkpoint-{n}") for n in (2, 4)}

    monkeypatch.undo()  # space freed / permissions fixed: resume
    resumed = worker.make_trainer(out)
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(out, reference, resumed.model)
