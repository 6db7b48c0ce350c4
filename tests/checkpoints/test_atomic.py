"""Atomic text and JSON writes leave the old file or the new one, and ordinary permissions; links are replaced,
never written through, and a folder linked out of the run folder is refused."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest
import torch

from hf_gradtools.atomic import write_file_atomic, write_json_atomic, write_text_atomic
from hf_gradtools.run_folder import OutsideRunFolderError
from hf_gradtools.snapshots.tensors import GradTensorCopy


def test_replaces_and_keeps_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "f.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert os.listdir(tmp_path / "sub") == ["f.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # not serialisable
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_write_that_fails_inside_the_temporary_file_leaves_no_trace(tmp_path):
    path = tmp_path / "predictions.txt"
    write_text_atomic(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "new\n" * 1000 + "\ud800")  # a lone surrogate: UTF-8 encoding fails mid-write
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["predictions.txt"]


# ---- a run folder's links (see `run_folder.py`) ----


def test_a_folder_linked_out_of_the_run_is_refused_and_a_linked_file_replaced(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    run.mkdir()
    outside.mkdir()
    (outside / "precious.txt").write_bytes(b"the user's own file\n")
    os.symlink(outside, run / "elsewhere")
    with pytest.raises(OutsideRunFolderError, match="elsewhere/f.json' leads out of the run folder"):
        write_json_atomic(run / "elsewhere" / "f.json", {"a": 1}, inside=run)
    with pytest.raises(OutsideRunFolderError, match="step-00000009.safetensors' leads out of"):
        GradTensorCopy(9, {"w": torch.ones(2)}).write_to_run(run, folder="elsewhere")
    os.symlink(outside / "precious.txt", run / "f.json")
    write_json_atomic(run / "f.json", {"a": 1}, inside=run)  # the link itself is replaced
    assert os.listdir(outside) == ["precious.txt"]
    assert (outside / "precious.txt").read_bytes() == b"the user's own file\n"
    assert not os.path.islink(run / "f.json") and json.loads((run / "f.json").read_text()) == {"a": 1}
    # The run folder itself may be a link: what the caller names is trusted, what it holds is not.
    os.symlink(run, tmp_path / "run-link")
    write_json_atomic(tmp_path / "run-link" / "g.json", {"b": 2}, inside=tmp_path / "run-link")
    assert json.loads((run / "g.json").read_text()) == {"b": 2}


def test_a_link_planted_at_the_temporary_name_is_not_written_through(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"keep")
    path = tmp_path / "grads.safetensors"
    os.symlink(target, tmp_path / f".grads.safetensors.{os.getpid()}.{threading.get_ident()}.tmp")

    def write(tmp: str) -> None:  # as `safetensors.torch.save_file` opens its file: no O_EXCL
        with open(tmp, "wb") as f:
            f.write(b"new")

    write_file_atomic(path, write)
    assert target.read_bytes() == b"keep" and path.read_bytes() == b"new"
