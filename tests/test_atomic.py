"""Atomic JSON writes leave the old file or the new one, and ordinary permissions."""

from __future__ import annotations

import json
import os
import stat

import pytest

from hf_gradtools.atomic import write_json_atomic


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
        write_json_atomic(path, {"a": object()})  # not serialisable: fails half-way through the dump
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]
