"""`file_damage` tells a whole weights or torch file from a cut-off one by its own structure."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from hf_gradtools.damaged_files import damaged_files, file_damage


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
    assert damaged_files(tmp_path) == []


def test_the_reasons_say_what_is_wrong(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6.0)}, path)  # a 24-byte tensor after the header
    header = len(path.read_bytes()) - 24 - 8
    truncate(path, 8 + header + 10)
    assert file_damage(path) == f"cut off: {8 + header + 10} bytes, where its header describes {8 + header + 24}"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    assert file_damage(path) == "not a safetensors file: its first 8 bytes give a header of 1099511627776 bytes"
    path.write_bytes(struct.pack("<Q", 64) + b"{}")
    assert file_damage(path) == "cut off: 10 bytes, and its header alone says 64 bytes"
    path.write_bytes(struct.pack("<Q", 4) + b"[1] ")
    assert file_damage(path) == "its safetensors header is not a JSON object"
    body = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 4)
    assert file_damage(path) == "its safetensors header has no valid `data_offsets` for 'a'"
    empty = tmp_path / "scheduler.pt"
    empty.write_bytes(b"")
    assert file_damage(empty) == "empty (0 bytes)"
    assert damaged_files(tmp_path) == [
        (str(path), "its safetensors header has no valid `data_offsets` for 'a'"),
        (str(empty), "empty (0 bytes)"),
    ]


def test_files_not_in_a_torch_format_are_damaged_and_legacy_ones_are_not_judged(tmp_path):
    legacy = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert file_damage(legacy) is None
    truncate(legacy, 20)
    assert file_damage(legacy) is None  # a cut-off legacy file is not found (see the module's docstring)
    for garbage in (bytes(4096), b"hello", b"\x80\x02garbage"):
        (tmp_path / "optimizer.pt").write_bytes(garbage)
        assert file_damage(tmp_path / "optimizer.pt") == (
            "not a torch file: it starts as neither torch's zip nor its legacy format"
        )


def test_json_files_and_shard_indexes(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": ')
    assert file_damage(tmp_path / "config.json").startswith("not JSON (JSONDecodeError")
    (tmp_path / "config.json").write_text("{}")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    save_file({"a": torch.ones(1)}, tmp_path / "model-1.safetensors")
    assert damaged_files(tmp_path) == [
        (str(index), "it names the shard 'model-2.safetensors', which is not in the folder")
    ]
    save_file({"b": torch.ones(1)}, tmp_path / "model-2.safetensors")
    assert damaged_files(tmp_path) == []


def test_files_a_resume_does_not_load_are_not_judged(tmp_path):
    for name in ("training_args.bin", "my_callback_state.pt", "notes.json", "running_stats.bin"):
        (tmp_path / name).write_bytes(b"")  # a callback's own files, in any format
    assert damaged_files(tmp_path) == []


def test_torch_weights_by_their_names_and_shards_named_by_an_index(tmp_path):
    names = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "adapter_model.bin", "pytorch_model_fsdp_0.bin"]
    names += ["optimizer_0.bin", "weights-part-a.bin"]
    for name in names:
        (tmp_path / name).write_bytes(b"numpy, not torch")
    index = {"weight_map": {"a": "weights-part-a.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    not_torch = "not a torch file: it starts as neither torch's zip nor its legacy format"
    assert damaged_files(tmp_path) == [(str(tmp_path / name), not_torch) for name in sorted(names)]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_links_are_followed_inside_the_run_folder_only(tmp_path):
    run = tmp_path / "run"
    folder = run / "checkpoint-2"
    folder.mkdir(parents=True)
    (tmp_path / "outside.pt").write_bytes(b"")
    (run / "inside.pt").write_bytes(b"")
    os.symlink(tmp_path / "outside.pt", folder / "optimizer.pt")  # leads out: not read (the resume refuses it)
    assert damaged_files(folder) == []
    os.symlink(run / "inside.pt", folder / "scheduler.pt")  # stays in the run folder: checked
    assert damaged_files(folder) == [(str(folder / "scheduler.pt"), "empty (0 bytes)")]
    os.symlink(folder, run / "checkpoint-4")
    assert damaged_files(run / "checkpoint-4") == [(str(run / "checkpoint-4" / "scheduler.pt"), "empty (0 bytes)")]
    (tmp_path / "other").mkdir()
    os.symlink(folder, tmp_path / "other" / "checkpoint-6")  # its target is not in its parent: not walked into
    assert damaged_files(tmp_path / "other" / "checkpoint-6") == []


def test_a_pipe_or_a_link_loop_with_a_name_a_resume_loads_is_damage(tmp_path):
    os.mkfifo(tmp_path / "optimizer.pt")  # torch.load would wait on it for good
    os.symlink("config.json", tmp_path / "config.json")  # a loop
    os.mkfifo(tmp_path / "a_callbacks_pipe")  # not loaded: not judged
    found = dict(damaged_files(tmp_path))
    assert found[str(tmp_path / "optimizer.pt")] == "not a regular file (a pipe or device)"
    assert found[str(tmp_path / "config.json")].startswith("unreadable (OSError: Too many levels of symbolic links")
    assert len(found) == 2
