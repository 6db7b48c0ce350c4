"""Faults during training: SIGKILL in the middle of a snapshot write, of a checkpoint save, of a step and at random
moments, SIGTERM, a full disk (real and simulated) and an unwritable folder. Every finished snapshot stays
readable, no temporary file is left where it could be mistaken for data, and the run resumes from its last
complete checkpoint to the same weights and snapshots as a run never interrupted.

The training processes fork from one server process that imported torch and transformers once: starting an
interpreter that imports them costs seconds each time."""

from __future__ import annotations

import builtins
import errno
import glob
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from hf_gradtools import GradTrainer, atomic, load_grad_snapshots
from hf_gradtools.checkpoints import (
    CheckpointSaveError,
    checkpoint_problem,
    checkpoint_step,
    last_complete_checkpoint,
)
from hf_gradtools.snapshots.tensors import grad_tensor_files, load_grad_tensors
from tests.helpers import fault_train

MAX_STEPS = fault_train.MAX_STEPS


def temporary_files(folder) -> list[str]:
    """This package's temporary files (`*.tmp`) and safetensors' (`.tmpXXXXXX`) anywhere under `folder`."""
    return sorted(
        {
            path
            for pattern in ("*.tmp", ".*.tmp", ".tmp*")
            for path in glob.glob(f"{folder}/**/{pattern}", recursive=True)
        }
    )


def assert_same_run(resumed_dir: str, reference, model, steps=range(1, MAX_STEPS + 1)) -> None:
    """Snapshots of every step kept, once each, and the final weights equal those of the uninterrupted reference."""
    resumed, expected = load_grad_snapshots(resumed_dir, strict=True), load_grad_snapshots(reference.args.output_dir)
    assert [s["step"] for s in resumed] == list(steps) == [s["step"] for s in expected]
    for a, b in zip(resumed, expected, strict=True):
        assert a["norms"] == pytest.approx(b["norms"], rel=1e-5, abs=1e-9), a["step"]
        assert a["total_norm_pre_clip"] == pytest.approx(b["total_norm_pre_clip"], rel=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    trainer = fault_train.make_trainer(str(tmp_path_factory.mktemp("reference") / "out"))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def processes():
    """Processes forked from a server that has imported torch, transformers and datasets once."""
    context = multiprocessing.get_context("forkserver")
    # Installed packages only: the server (Python 3.11) does not get this process's `sys.path`; its children do.
    context.set_forkserver_preload(["torch", "transformers.trainer", "datasets"])
    return context


def start(processes, target, tmp_path, *args):
    """Start `target(output_dir, signal_dir, *args)` in a training process; return it, the folders it uses."""
    out, signals = str(tmp_path / "out"), tmp_path / "signals"
    signals.mkdir()
    child = processes.Process(target=target, args=(out, str(signals), *args), daemon=True)
    child.start()
    return child, out, signals


def wait_for(child, signals, names: tuple[str, ...], timeout: float = 240) -> None:
    """Wait until the process has created every file of `names` in `signals` (it hangs there)."""
    deadline = time.monotonic() + timeout
    while not all((signals / name).exists() for name in names):
        error = signals / "error"
        assert child.is_alive(), error.read_text()[-3000:] if error.exists() else f"exit code {child.exitcode}"
        assert time.monotonic() < deadline, f"the training process never reached {names}"
        time.sleep(0.02)


def kill(child) -> None:
    """SIGKILL the process, unless it ended already (with an error the caller reports)."""
    if child.is_alive():
        child.kill()
        child.join()
        assert child.exitcode == -signal.SIGKILL
    child.join()


def kill_when_hanging(tmp_path, processes, where: str, waits_for: tuple[str, ...]) -> str:
    """Run the worker until it hangs where asked, SIGKILL it, and return its output_dir."""
    child, out, signals = start(processes, fault_train.main, tmp_path, where)
    try:
        wait_for(child, signals, waits_for)
    finally:
        kill(child)
    return out


def test_sigkill_mid_snapshot_write_then_resume(tmp_path, processes, reference, caplog):
    out = kill_when_hanging(tmp_path, processes, "snapshot", ("snapshot",))
    # What the kill left: a half-written temporary snapshot file, and no checkpoint-6: its save waits for the
    # snapshots of its steps to be written first.
    folder = os.path.join(out, "grad_snapshots")
    (tmp,) = temporary_files(folder)
    assert os.path.basename(tmp).startswith(".step-00000006.json.")
    assert not os.path.exists(os.path.join(out, "checkpoint-6"))
    snapshots = load_grad_snapshots(out, strict=True)  # every finished snapshot, nothing in the way
    assert [s["step"] for s in snapshots] == [1, 2, 3, 4, 5]
    assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-4")

    trainer = fault_train.make_trainer(out)
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 8
    # Step 5 is done again after resuming: its snapshot from the killed run went first.
    assert f"hf_gradtools: resuming from step 4; deleted the 1 snapshot file(s) of later steps in {folder}." in [
        r.getMessage() for r in caplog.records
    ]
    assert_same_run(out, reference, trainer.model)


def test_sigkill_mid_save_then_resume(tmp_path, processes, reference, caplog):
    out = kill_when_hanging(tmp_path, processes, "save", ("save",))
    # A checkpoint-6 without its trainer state; the snapshots of its steps were written before it began.
    assert checkpoint_problem(os.path.join(out, "checkpoint-6")) == "no trainer_state.json (the save did not finish)"
    assert [s["step"] for s in load_grad_snapshots(out, strict=True)] == [1, 2, 3, 4, 5, 6]
    assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-4")

    trainer = fault_train.make_trainer(out)
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        trainer.train(resume_from_checkpoint=True)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"Skipping incomplete checkpoint {out}{os.sep}checkpoint-6") for m in messages)
    assert checkpoint_problem(os.path.join(out, "checkpoint-6")) is None  # saved again, completely this time
    assert_same_run(out, reference, trainer.model)


def test_sigkill_mid_step_then_resume(tmp_path, processes, reference):
    out = kill_when_hanging(tmp_path, processes, "step", ("step",))
    assert temporary_files(out) == []
    assert [s["step"] for s in load_grad_snapshots(out, strict=True)] == [1, 2, 3, 4, 5, 6]
    assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-6")
    trainer = fault_train.make_trainer(out)
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
    out = str(tmp_path / "out")
    trainer = fault_train.make_trainer(out, **fault_train.TENSOR_SETTINGS)
    monkeypatch.setattr(atomic, "open", failing_open(3, error), raising=False)
    with pytest.raises(OSError) as raised:
        trainer.train()
    assert raised.value.errno == error
    assert "step-00000003.json" in str(raised.value)  # says which file could not be written
    assert trainer.state.global_step <= 4  # stopped at the next step (or at the checkpoint right after it)
    assert temporary_files(out) == []
    # The tensors of step 3 were written before its JSON failed: removed with it, no orphan.
    files = sorted(os.listdir(os.path.join(out, "grad_snapshots")))
    assert files == [f"step-0000000{n}.{ending}" for n in (1, 2) for ending in ("json", "safetensors")]
    assert [s["step"] for s in load_grad_snapshots(out, strict=True)] == [1, 2]
    # No checkpoint vouches for step 3, whose snapshot is missing.
    assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-2")

    monkeypatch.undo()  # space freed / permissions fixed: resume
    resumed = fault_train.make_trainer(out)
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(out, reference, resumed.model)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs to fill up (root only: `mount`)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, keep_bytes: int) -> str:
    """Take all the free space of `disk` but `keep_bytes` (whole pages) with one file; return its path."""
    stats = os.statvfs(disk)
    page = stats.f_frsize
    keep = -(-keep_bytes // page) * page
    filler = os.path.join(disk, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, stats.f_bavail * page - keep)
    finally:
        os.close(fd)
    return filler


def disk_filling_trainer(disk, file: str):
    """A GradTrainer that fills `disk` while it saves checkpoint-4, leaving room for half of `file` (as big as
    checkpoint-2's) and for the files written before it in the same call."""

    def size(output_dir: str, name: str) -> int:
        return os.path.getsize(os.path.join(os.path.dirname(output_dir), "checkpoint-2", name))

    class DiskFillingTrainer(GradTrainer):
        def save_model(self, output_dir=None, _internal_call=False):
            if file == "model.safetensors" and output_dir.endswith("checkpoint-4"):
                # `config.json` (one page) first, then the weights: safetensors' `I/O error: ... (os error 28)`
                fill(disk, os.statvfs(disk).f_frsize + size(output_dir, file) // 2)
            super().save_model(output_dir, _internal_call)

        def _save_optimizer_and_scheduler(self, output_dir):
            if file == "optimizer.pt" and output_dir.endswith("checkpoint-4"):
                fill(disk, size(output_dir, file) // 2)  # torch.save: `unexpected pos ... vs ...`
            super()._save_optimizer_and_scheduler(output_dir)

        def _save_rng_state(self, output_dir):
            super()._save_rng_state(output_dir)
            if file == "trainer_state.json" and output_dir.endswith("checkpoint-4"):
                fill(disk, 0)  # a plain Python write: `OSError: [Errno 28] No space left on device`, no file named

    return DiskFillingTrainer


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_disk_full_during_a_checkpoint_names_the_file_and_resume_skips_it(small_disk, reference, file):
    out = str(small_disk / "out")
    trainer = fault_train.make_trainer(out, disk_filling_trainer(small_disk, file))
    with pytest.raises(CheckpointSaveError) as raised:
        trainer.train()
    folder = os.path.join(out, "checkpoint-4")
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == os.path.join(folder, file)
    assert str(raised.value).startswith(
        f"Could not save the checkpoint {folder}: no space left for {folder}{os.sep}{file} on its device (ENOSPC, "
        "errno 28: No space left on device). The folder is incomplete, "
    )
    assert "`resume_from_checkpoint=True` will skip it" in str(raised.value)
    assert checkpoint_problem(folder) is not None
    assert last_complete_checkpoint(out) == os.path.join(out, "checkpoint-2")
    assert temporary_files(out) == []

    os.remove(small_disk / "filler")  # space freed: resume
    resumed = fault_train.make_trainer(out)
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(out, reference, resumed.model)


def test_sigterm_writes_the_queued_snapshots_then_exits(tmp_path, processes):
    child, out, signals = start(processes, fault_train.main, tmp_path, "term")
    try:
        wait_for(child, signals, ("term",))
        folder = os.path.join(out, "grad_snapshots")
        last = os.path.join(folder, f"step-{fault_train.TERM_STEP:08d}.json")
        assert not os.path.exists(last)  # still queued: the writer is slow
        sent = time.monotonic()
        os.kill(child.pid, signal.SIGTERM)
        child.join(timeout=30)
        took = time.monotonic() - sent
    finally:
        if child.is_alive():
            kill(child)
    assert child.exitcode == 128 + signal.SIGTERM, child.exitcode  # what a shell reports for SIGTERM
    assert took < 30
    # Every finished step's snapshot, JSON and tensors, and nothing half-written.
    steps = list(range(1, fault_train.TERM_STEP + 1))
    assert [s["step"] for s in load_grad_snapshots(out, strict=True)] == steps
    assert list(grad_tensor_files(out)) == steps
    assert set(load_grad_tensors(out, step=fault_train.TERM_STEP)) == {
        "classifier.weight",
        "classifier.bias",
        "bert.encoder.layer.2.output.dense.weight",
    }
    assert temporary_files(out) == []


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory):
    trainer = fault_train.make_trainer(
        str(tmp_path_factory.mktemp("kill-reference") / "out"), **fault_train.KILL_SETTINGS
    )
    trainer.train()
    return trainer


def run_files(out: str) -> list[str]:
    """Every file of a run folder, relative to it, but the temporary files a kill leaves in the snapshot folder
    (which every reader ignores; a checkpoint saved again loses those of its own interrupted save)."""
    found = []
    for folder, _, names in os.walk(out):
        cut = (
            [n for n in names if n.endswith(".tmp") or n.startswith(".tmp")]
            if folder.endswith("grad_snapshots")
            else []
        )
        found += [os.path.relpath(os.path.join(folder, n), out) for n in names if n not in cut]
    return sorted(found)


def kill_at(processes, tmp_path, after, delay: float) -> str:
    """Train with `KILL_SETTINGS` in a process, SIGKILL it `delay` seconds after it reports `after` (a finished
    step, or "done": `train()` returned); return its output_dir."""
    receive, send = processes.Pipe(duplex=False)
    child, out, signals = start(processes, fault_train.train_and_report, tmp_path, send)
    send.close()
    try:
        while True:
            if not receive.poll(240):
                pytest.fail(f"the training process reported nothing for 240 s (exit code {child.exitcode})")
            try:
                if receive.recv() == after:
                    break
            except EOFError:
                error = signals / "error"
                pytest.fail(error.read_text()[-3000:] if error.exists() else f"exit code {child.exitcode}")
        time.sleep(delay)
    finally:
        kill(child)
        receive.close()
    return out


def test_sigkill_at_random_moments_then_resume(tmp_path, processes, kill_reference):
    """Snapshots and tensors every step, a checkpoint every 2 steps, the newest 3 snapshots kept; killed at seeded
    random moments (the last one after the run finished, before the process exited)."""
    rng = random.Random(17)
    moments = [(rng.randint(2, MAX_STEPS), rng.uniform(0.0, 0.3)) for _ in range(3)] + [("done", rng.uniform(0, 0.1))]
    expected_files = run_files(kill_reference.args.output_dir)
    reference_dir = kill_reference.args.output_dir
    for n, (after, delay) in enumerate(moments):
        moment = f"kill {n}: {delay:.3f} s after {after}"
        run = tmp_path / f"run-{n}"
        run.mkdir()
        out = kill_at(processes, run, after, delay)
        kept = [s["step"] for s in load_grad_snapshots(out, strict=True)]
        checkpoint = last_complete_checkpoint(out)
        if checkpoint is not None:  # the snapshots of its steps are on disk before it counts as complete
            assert checkpoint_step(checkpoint) in kept, moment

        trainer = fault_train.make_trainer(out, **fault_train.KILL_SETTINGS)
        trainer.train(resume_from_checkpoint=checkpoint is not None or None)
        assert trainer.state.global_step == MAX_STEPS, moment
        assert run_files(out) == expected_files, moment
        assert_same_run(out, kill_reference, trainer.model, steps=range(MAX_STEPS - 2, MAX_STEPS + 1))
        assert list(grad_tensor_files(out)) == list(range(MAX_STEPS - 2, MAX_STEPS + 1)), moment
        for step in grad_tensor_files(out):
            got, want = load_grad_tensors(out, step=step), load_grad_tensors(reference_dir, step=step)
            assert set(got) == set(want), moment
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8, msg=f"{moment}: {name}")
