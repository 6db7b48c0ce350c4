"""Atomic text and JSON writes leave the old file or the new one, and ordinary permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from hf_gradtools.atomic import write_json_atomic, write_text_atomic


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
