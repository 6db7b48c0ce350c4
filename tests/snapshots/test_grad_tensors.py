"""Gradient tensors on disk: equal to the gradients, written atomically, read lazily."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hf_gradtools.snapshots.tensors as grad_tensors
from hf_gradtools.clipping import clip_gradients
from hf_gradtools.snapshots.tensors import (
    GradTensorSaver,
    grad_tensor_files,
    grad_tensor_path,
    load_grad_tensors,
)
from tests.conftest import tiny_classifier, token_rows

PATTERNS = [r"^classifier\.", r"encoder\.layer\.1\.output\.dense"]
CHOSEN = [
    "bert.encoder.layer.1.output.dense.weight",
    "bert.encoder.layer.1.output.dense.bias",
    "classifier.weight",
    "classifier.bias",
]


@pytest.fixture(scope="module")
def bert():
    model = tiny_classifier("bert")
    model(input_ids=torch.tensor(token_rows(4)), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    return model


def test_saved_tensors_equal_the_gradients_before_clipping(bert, tmp_path):
    saver = GradTensorSaver(bert.named_parameters(), PATTERNS)
    assert saver.names == CHOSEN  # parameter order
    expected = {name: p.grad.clone() for name, p in bert.named_parameters() if name in CHOSEN}
    copy = saver.copy(step=12)
    # Clipping right after the copy changes the gradients in place, not the copies.
    clip_gradients(bert.parameters(), max_norm=1e-4)
    assert not torch.equal(bert.classifier.weight.grad, expected["classifier.weight"])
    path = copy.write_to_run(tmp_path)
    assert path == os.path.join(str(tmp_path), "grad_snapshots", "step-00000012.safetensors")
    assert os.listdir(tmp_path / "grad_snapshots") == ["step-00000012.safetensors"]
    loaded = load_grad_tensors(path)
    assert loaded.step == 12 and list(loaded) == CHOSEN and len(loaded) == 4
    for name in CHOSEN:
        assert torch.equal(loaded[name], expected[name]), name
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"step": "12", "names": json.dumps(CHOSEN)}


def test_load_by_step_from_the_run_or_its_snapshot_folder(bert, tmp_path):
    saver = GradTensorSaver(bert.named_parameters(), [r"^classifier\.bias$"])
    for step in (5, 10):
        saver.copy(step).write_to_run(tmp_path)
    (tmp_path / "grad_snapshots" / "step-00000005.json").write_text("{}")  # a JSON snapshot beside them
    assert list(grad_tensor_files(tmp_path)) == [5, 10]
    assert list(grad_tensor_files(tmp_path / "grad_snapshots")) == [5, 10]
    # A named snapshot callback's folder.
    named = saver.copy(15).write_to_run(tmp_path, folder="grad_snapshots_l1")
    assert named == os.path.join(str(tmp_path), "grad_snapshots_l1", "step-00000015.safetensors")
    assert list(grad_tensor_files(tmp_path / "grad_snapshots_l1")) == [15]
    grads = load_grad_tensors(tmp_path, step=10)
    assert grads.step == 10 and torch.equal(grads["classifier.bias"], bert.classifier.bias.grad)
    with pytest.raises(FileNotFoundError, match=r"No gradient tensors of step 7 .* \(steps with tensors: 5, 10\)"):
        load_grad_tensors(tmp_path, step=7)
    with pytest.raises(FileNotFoundError, match="give the `step`"):
        load_grad_tensors(tmp_path)
    with pytest.raises(KeyError, match=r"'classifier.weight' is not in .* it holds 'classifier.bias'"):
        grads["classifier.weight"]


def test_same_folder_as_the_json_snapshots():
    from hf_gradtools import snapshots

    assert grad_tensors.SNAPSHOT_DIR == snapshots.SNAPSHOT_DIR


def test_values_are_read_on_access(tmp_path):
    path = str(tmp_path / "g.safetensors")
    save_file({"w": torch.zeros(3)}, path, metadata={"step": "1", "names": '["w"]'})
    lazy = load_grad_tensors(path)
    # Replace the file after opening: a lazy mapping returns the new values, a loaded copy would not.
    save_file({"w": torch.ones(3)}, path, metadata={"step": "1", "names": '["w"]'})
    assert torch.equal(lazy["w"], torch.ones(3))
    assert "w" in lazy and "v" not in lazy and dict(lazy.items()).keys() == {"w"}


def test_dtype_kept_and_missing_grads_left_out(tmp_path):
    layer = torch.nn.Linear(2, 2).to(torch.bfloat16)
    layer.weight.grad = torch.tensor([[1.5, -2.0], [0.25, 3.0]], dtype=torch.bfloat16)
    copy = GradTensorSaver(layer.named_parameters(), ["weight", "bias"]).copy(step=3)
    assert list(copy.tensors) == ["weight"]  # the bias has no gradient
    loaded = load_grad_tensors(copy.write(tmp_path / "x.safetensors"))
    assert loaded["weight"].dtype == torch.bfloat16 and torch.equal(loaded["weight"], layer.weight.grad)


def test_a_pattern_that_matches_nothing_names_the_field(bert):
    with pytest.raises(ValueError) as error:
        GradTensorSaver(bert.named_parameters(), [r"^classifier\.", "decoder"])
    message = str(error.value)
    assert message.startswith("`grad_snapshot_tensors` pattern 'decoder' matches no parameter; parameter names look")
    assert "'bert.embeddings.word_embeddings.weight'" in message and "more)" in message
    with pytest.raises(ValueError, match="`grad_snapshot_tensors` pattern '\\[' is not a valid regular expression"):
        GradTensorSaver(bert.named_parameters(), ["["])


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    layer = torch.nn.Linear(2, 1)
    layer.weight.grad = torch.ones(1, 2)
    saver = GradTensorSaver(layer.named_parameters(), ["weight"])
    path = grad_tensor_path(tmp_path, 4)
    saver.copy(4).write(path)
    old = Path(path).read_bytes()

    def fail_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(grad_tensors, "save_file", fail_midway)
    layer.weight.grad = torch.full((1, 2), 2.0)
    with pytest.raises(OSError, match="No space left"):
        saver.copy(4).write(path)
    assert Path(path).read_bytes() == old
    assert os.listdir(os.path.dirname(path)) == ["step-00000004.safetensors"]


def test_a_misspelt_pattern_names_the_closest_parameters(bert):
    with pytest.raises(ValueError) as error:
        GradTensorSaver(bert.named_parameters(), [r"^clasifier\."])
    assert "matches no parameter; the closest names: classifier.bias, classifier.weight;" in str(error.value)
