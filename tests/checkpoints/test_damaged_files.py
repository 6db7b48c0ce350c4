"""`file_damage` tells a whole weights or torch file from a cut-off one by its own structure."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from hf_gradtools.damaged_files import damaged_file, file_damage


def truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_whole_files_pass_and_every_cut_of_them_is_found(tmp_path):
    weights, optimizer = tmp_path / "model.safetensors", tmp_path / "optimizer.pt"
    save_file({"a": torch.arange(6.0), "b": torch.ones(2, 3, dtype=torch.float16)}, weights)
    torch.save({"state": {0: {"exp_avg": torch.randn(50)}}, "param_groups": []}, optimizer)
    assert file_damage(weights) is None and file_damage(optimizer) is None
    for path in (weights, optimizer):
        whole = path.read_bytes()
        for size in (0, 3, 9, len(whole) // 2, len(whole) - 1):
            truncate(path, size)
            assert file_damage(path) is not None, (path.name, size)
            path.write_bytes(whole)
    assert damaged_file(tmp_path) is None


def test_the_reasons_say_what_is_wrong(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6.0)}, path)  # a 24-byte tensor after the header
    header = len(path.read_bytes()) - 24 - 8
    truncate(path, 8 + header + 10)
    assert file_damage(path) == f"cut off: {8 + header + 10} bytes, where its header describes {8 + header + 24}"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    assert file_damage(path) == "cut off: 10 bytes, and its header alone says 1099511627776 bytes"
    path.write_bytes(struct.pack("<Q", 4) + b"[1] ")
    assert file_damage(path) == "its safetensors header is not a JSON object"
    body = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    assert file_damage(path) == "its safetensors header has no valid `data_offsets` for 'a'"
    empty = tmp_path / "scheduler.pt"
    empty.write_bytes(b"")
    assert file_damage(empty) == "empty (0 bytes)"
    assert damaged_file(tmp_path) == (str(path), "its safetensors header has no valid `data_offsets` for 'a'")


def test_other_files_and_torch_legacy_files_are_not_judged(tmp_path):
    legacy = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert file_damage(legacy) is None
    (tmp_path / "config.json").write_text("{")
    assert file_damage(tmp_path / "config.json") is None


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_links_are_not_followed(tmp_path):
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"")
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    os.symlink(outside, folder / "optimizer.pt")
    assert damaged_file(folder) is None
    os.symlink(folder, tmp_path / "checkpoint-4")
    (folder / "scheduler.pt").write_bytes(b"")
    assert damaged_file(tmp_path / "checkpoint-4") is None  # not walked into
    assert damaged_file(folder) == (str(folder / "scheduler.pt"), "empty (0 bytes)")
