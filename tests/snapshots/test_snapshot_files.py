"""Snapshot folders after crashes and by hand: damaged files are skipped and reported; retention keeps the newest."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch

from hf_gradtools.atomic import write_json_atomic
from hf_gradtools.clipping import ClipResult
from hf_gradtools.snapshots import (
    DamagedSnapshotError,
    discard_grad_snapshots_after,
    load_grad_snapshots,
    prune_grad_snapshots,
)
from hf_gradtools.snapshots.files import _write_snapshot


def snapshot(step: int) -> dict:
    return {"step": step, "norm_type": 2.0, "total_norm_pre_clip": 1.0, "total_norm_post_clip": 1.0, "norms": {}}


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "grad_snapshots"
    for step in (1, 2, 3):
        write_json_atomic(path / f"step-{step:08d}.json", snapshot(step))
    return path


DAMAGED = {
    "empty": "",
    "truncated": json.dumps(snapshot(7))[:25],
    "foreign list": "[1, 2, 3]",
    "foreign object": '{"hello": "world"}',
    "step not an integer": '{"step": "7", "norms": {}}',
    "not text": b"\xff\xfe\x00garbage",
    "a norm not a number": '{"step": 7, "norms": {"w": "x"}}',
    "a total norm not a number": '{"step": 7, "norms": {}, "total_norm_pre_clip": null}',
    "norm type unknown": '{"step": 7, "norm_type": "fro", "norms": {}}',
    "norm type too large for a float": f'{{"step": 7, "norm_type": {10**400}, "norms": {{}}}}',
    "a norm negative": '{"step": 7, "norms": {"w": -1.0}}',
    "a norm minus infinity": '{"step": 7, "norms": {"w": -Infinity}}',
    "a norm too large for a float": f'{{"step": 7, "norms": {{"w": {10**400}}}}}',
    "a total norm negative": '{"step": 7, "norms": {"w": 1.0}, "total_norm_pre_clip": -1.0}',
    "step negative": '{"step": -7, "norms": {}}',
    "step too large for a float": f'{{"step": {10**400}, "norms": {{}}}}',
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_file_is_skipped_and_reported(folder, caplog, content):
    bad = folder / "step-00000007.json"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content)
    with caplog.at_level(logging.WARNING, logger="hf_gradtools.snapshots"):
        snapshots = load_grad_snapshots(folder.parent)
    assert [s["step"] for s in snapshots] == [1, 2, 3]
    assert list(snapshots.skipped) == [str(bad)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step-00000007.json" in warnings[0].getMessage()
    with pytest.raises(DamagedSnapshotError, match="step-00000007.json"):
        load_grad_snapshots(folder, strict=True)


def test_the_markers_of_a_non_finite_step_are_read_back(folder):
    # What `_write_snapshot` writes for a step skipped for a non-finite gradient: NaN and inf norms (JSON's `NaN`
    # and `Infinity`); they are norms, unlike a negative number.
    result = ClipResult(torch.tensor([math.nan, math.inf, 0.0]), torch.tensor(math.nan), torch.tensor(math.inf))
    _write_snapshot(str(folder / "step-00000004.json"), 4, 2.0, ["a", "b", "c"], result, skipped=True)
    snapshots = load_grad_snapshots(folder.parent, strict=True)
    last = snapshots[-1]
    assert last["step"] == 4 and last["skipped"] is True and snapshots.skipped == {}
    assert math.isnan(last["norms"]["a"]) and last["norms"]["b"] == math.inf and last["norms"]["c"] == 0.0
    assert math.isnan(last["total_norm_pre_clip"]) and last["total_norm_post_clip"] == math.inf


def test_one_warning_names_every_damaged_file(folder, caplog):
    (folder / "step-00000008.json").write_text("")
    (folder / "step-00000009.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="hf_gradtools.snapshots"):
        snapshots = load_grad_snapshots(folder)
    assert len(snapshots) == 3 and len(snapshots.skipped) == 2
    (warning,) = caplog.records
    assert "step-00000008.json" in warning.getMessage() and "step-00000009.json" in warning.getMessage()


def test_temporary_and_unrelated_files_are_ignored_silently(folder, caplog):
    (folder / ".step-00000004.json.123.456.tmp").write_text('{"step": 4, "no')  # a write cut off by a kill
    (folder / "notes.txt").write_text("mine")
    (folder / "step-00000002.safetensors").write_bytes(b"\x00" * 8)
    with caplog.at_level(logging.WARNING):
        snapshots = load_grad_snapshots(folder, strict=True)
    assert [s["step"] for s in snapshots] == [1, 2, 3] and snapshots.skipped == {}
    assert not caplog.records
    assert isinstance(snapshots, list) and snapshots == [snapshot(1), snapshot(2), snapshot(3)]


def test_prune_keeps_the_newest_and_removes_json_and_tensors_together(folder):
    for step in (1, 2, 3):
        (folder / f"step-{step:08d}.safetensors").write_bytes(b"t")
    (folder / "step-00000010.json").write_text(json.dumps(snapshot(10)))  # newer than 3 by step, not by name
    unrelated = ["notes.txt", "step-final.json", "step-00000001.json.bak", ".step-00000001.json.1.2.tmp"]
    for name in unrelated:
        (folder / name).write_text("keep me")
    removed = prune_grad_snapshots(folder.parent, keep=2)
    assert sorted(os.path.basename(f) for f in removed) == [
        "step-00000001.json",
        "step-00000001.safetensors",
        "step-00000002.json",
        "step-00000002.safetensors",
    ]
    assert sorted(os.listdir(folder)) == sorted(
        ["step-00000003.json", "step-00000003.safetensors", "step-00000010.json", *unrelated]
    )
    assert prune_grad_snapshots(folder, keep=2) == []  # again: nothing more to do
    assert [s["step"] for s in load_grad_snapshots(folder)] == [3, 10]
    removed = prune_grad_snapshots(folder, keep=1)
    assert sorted(os.path.basename(f) for f in removed) == ["step-00000003.json", "step-00000003.safetensors"]
    assert prune_grad_snapshots(folder, keep=5) == []


def test_prune_edge_cases(tmp_path, folder):
    assert prune_grad_snapshots(tmp_path / "missing", keep=1) == []
    assert prune_grad_snapshots(folder, keep=None) == []
    assert len(os.listdir(folder)) == 3
    for keep in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`keep` must be a positive integer"):
            prune_grad_snapshots(folder, keep=keep)


def test_prune_one_series_of_a_shared_folder(folder):
    for step in (1, 2, 3):
        (folder / f"step-{step:08d}.l1.json").write_text(json.dumps(snapshot(step)))
    removed = prune_grad_snapshots(folder, keep=1, variant=".l1")
    assert sorted(os.path.basename(f) for f in removed) == ["step-00000001.l1.json", "step-00000002.l1.json"]
    removed = prune_grad_snapshots(folder, keep=2, variant="")
    assert [os.path.basename(f) for f in removed] == ["step-00000001.json"]
    assert sorted(os.listdir(folder)) == ["step-00000002.json", "step-00000003.json", "step-00000003.l1.json"]


def test_discard_the_snapshots_of_steps_a_resumed_run_does_again(folder):
    (folder / "step-00000003.safetensors").write_bytes(b"t")
    (folder / ".step-00000004.json.1.2.tmp").write_text("{")
    removed = discard_grad_snapshots_after(folder.parent, 2)
    assert sorted(os.path.basename(f) for f in removed) == ["step-00000003.json", "step-00000003.safetensors"]
    assert sorted(os.listdir(folder)) == [".step-00000004.json.1.2.tmp", "step-00000001.json", "step-00000002.json"]
    assert discard_grad_snapshots_after(folder, 2) == [] and discard_grad_snapshots_after(folder / "x", 0) == []


def test_a_folder_or_a_pipe_named_like_a_snapshot_is_skipped_not_waited_on(folder):
    os.mkdir(folder / "step-00000004.json")
    os.mkfifo(folder / "step-00000005.json")  # opening a pipe for reading waits for a writer: not done
    snapshots = load_grad_snapshots(folder)
    assert [s["step"] for s in snapshots] == [1, 2, 3]
    assert {os.path.basename(f): why for f, why in snapshots.skipped.items()} == {
        "step-00000004.json": f"{str(folder / 'step-00000004.json')!r} is not a file (a folder, a pipe or a device).",
        "step-00000005.json": f"{str(folder / 'step-00000005.json')!r} is not a file (a folder, a pipe or a device).",
    }
    # Pruning deletes the pipe (a file entry) and passes over the folder.
    removed = prune_grad_snapshots(folder, keep=1)
    assert sorted(os.path.basename(f) for f in removed) == [
        "step-00000001.json", "step-00000002.json", "step-00000003.json"
    ]  # fmt: skip
    assert sorted(os.listdir(folder)) == ["step-00000004.json", "step-00000005.json"]
    assert discard_grad_snapshots_after(folder, 0) == [str(folder / "step-00000005.json")]
