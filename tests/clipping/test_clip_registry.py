"""The clip-algorithm registry: a registered algorithm trains as a hand-written loop that applies it, keeps its state
across a resume, adds its log entries, parses from the command line; an unknown name lists the registered ones."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import HfArgumentParser

from hf_gradtools import (
    ClipAlgorithm,
    DamagedCheckpointError,
    GradTrainer,
    GradTrainingArguments,
    register_clip_algorithm,
)
from hf_gradtools.checkpoints import COMPONENT_CHECKS, TRAINING_STATE_FILE
from hf_gradtools.clipping import CLIP_ALGORITHMS, clip_by, unregister_clip_algorithm
from hf_gradtools.clipping.component import GradientClipping
from hf_gradtools.clipping.registry import RESERVED_NAMES
from hf_gradtools.trainer import check_engine_support
from tests.conftest import classification_data, grad_args, tiny_classifier
from tests.trainer.test_clipping_guards_monitoring_in_grad_trainer import assert_same_parameters, rows, train_settings

BUILT_IN = ["norm", "agc", "autoclip", "zclip"]


class Halve(ClipAlgorithm):
    def clip(self, named_parameters, norm_type):
        for _, p in named_parameters:
            p.grad.mul_(0.5)


class Decay(ClipAlgorithm):
    """Scales the gradient by 1 / (1 + steps so far): its state changes what it does."""

    def __init__(self):
        self.steps = 0

    def clip(self, named_parameters, norm_type):
        for _, p in named_parameters:
            p.grad.mul_(1.0 / (1 + self.steps))
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        steps = state.get("steps") if isinstance(state, dict) else None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"`steps` must be a non-negative integer, got {steps!r}")
        self.steps = steps

    def log_entries(self):
        return {"decay_steps": self.steps}


@pytest.fixture
def registered():
    """Register `Halve` as "halve" and `Decay` as "decay" for one test, and leave the registry as it was."""
    register_clip_algorithm("halve")(Halve)
    register_clip_algorithm("decay")(Decay)
    yield
    unregister_clip_algorithm("halve")
    unregister_clip_algorithm("decay")
    assert list(CLIP_ALGORITHMS) == BUILT_IN


def sgd_hand_loop(model, data, algorithm, *, clip_value, batch, accumulation, steps, lr):
    """loss / N, backward, clamp to `clip_value`, the algorithm, SGD step, zero."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        for micro in range(accumulation):
            start = (step * accumulation + micro) * batch
            (model(**rows(data, start, start + batch)).loss / accumulation).backward()
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        if clip_value is not None:
            for _, p in named:
                p.grad.clamp_(-clip_value, clip_value)
        algorithm.clip(named, 2.0)
        optimizer.step()
        optimizer.zero_grad()
    return model


def sgd_args(tmp_path, **fields):
    """`train_settings` (accumulation 2, constant learning rate) with plain SGD at 0.1."""
    return train_settings(lambda **kw: grad_args(tmp_path, **kw), optim="sgd", learning_rate=1e-1, **fields)


@pytest.mark.parametrize("clip_value", [None, 0.01], ids=["algorithm", "value-then-algorithm"])
def test_registered_algorithm_equals_hand_loop(tmp_path, registered, single_thread, clip_value):
    data = classification_data(24)
    expected = sgd_hand_loop(
        tiny_classifier(), data, Halve(), clip_value=clip_value, batch=4, accumulation=2, steps=3, lr=1e-1
    )
    args = sgd_args(tmp_path, clip_algorithm="halve", clip_grad_value=clip_value, log_grad_norms=True)
    assert args.max_grad_norm == 1.0  # drives `norm` only: the hand loop does no norm clipping
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=data)
    trainer.train()
    assert_same_parameters(trainer.model, expected)
    logs = [h for h in trainer.state.log_history if "clip_coef" in h]
    assert len(logs) == 3
    for log in logs:
        # `grad_norm` is the norm before any clipping, `grad_norm_post_clip` measured after the algorithm ran.
        assert log["grad_norm_post_clip"] <= 0.5 * log["grad_norm"] * (1 + 1e-5)
        if clip_value is None:
            assert log["clip_coef"] == pytest.approx(0.5, rel=1e-6)


def test_clip_by_measures_the_norm_after_the_algorithm(registered):
    layer = torch.nn.Linear(2, 1)
    layer.weight.grad, layer.bias.grad = torch.tensor([[3.0, 4.0]]), torch.tensor([0.0])
    result = clip_by(Halve(), layer.named_parameters(), norm_type=2.0)
    assert (result.total_norm.item(), result.total_norm_post_clip.item()) == (5.0, 2.5)
    assert result.param_norms.tolist() == [5.0, 0.0]
    assert layer.weight.grad.tolist() == [[1.5, 2.0]]


def decay_run(tmp_path, name, **fields):
    common = dict(max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, clip_algorithm="decay")
    return sgd_args(tmp_path / name, **{**common, **fields})


def test_state_survives_resume_and_log_entries_reach_the_logs(tmp_path, registered, single_thread):
    data = classification_data(24)
    full = GradTrainer(
        model=tiny_classifier(),
        args=decay_run(tmp_path, "full", save_strategy="steps", save_steps=2),
        train_dataset=data,
    )
    full.train()
    assert [h["decay_steps"] for h in full.state.log_history if "loss" in h] == [1, 2, 3, 4]
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    with open(checkpoint / TRAINING_STATE_FILE) as f:
        assert json.load(f) == {"decay": {"steps": 2}}

    resumed = GradTrainer(model=tiny_classifier(seed=5), args=decay_run(tmp_path, "re"), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.component(GradientClipping).algorithm(resumed.model).steps == 4
    # The checkpoint's log history holds steps 1 and 2, the resumed run logs 3 and 4.
    assert [h["decay_steps"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3, 4]
    assert_same_parameters(resumed.model, full.model)

    # Without the state the run differs: the state is what makes the resumed run equal.
    os.remove(checkpoint / TRAINING_STATE_FILE)
    fresh = GradTrainer(model=tiny_classifier(seed=5), args=decay_run(tmp_path, "fresh"), train_dataset=data)
    fresh.train(resume_from_checkpoint=str(checkpoint))
    assert fresh.component(GradientClipping).algorithm(fresh.model).steps == 2
    assert not torch.allclose(fresh.model.classifier.weight, full.model.classifier.weight, rtol=0, atol=1e-6)


def test_damaged_state_is_refused_naming_file_and_entry(tmp_path, registered, single_thread):
    data = classification_data(8)
    run = GradTrainer(
        model=tiny_classifier(),
        args=decay_run(tmp_path, "full", max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=data,
    )
    run.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    (checkpoint / TRAINING_STATE_FILE).write_text(json.dumps({"decay": {"steps": -1}}))
    resumed = GradTrainer(model=tiny_classifier(), args=decay_run(tmp_path, "full", max_steps=4), train_dataset=data)
    with pytest.raises(DamagedCheckpointError) as caught:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    message = str(caught.value)
    assert TRAINING_STATE_FILE in message and "`decay` cannot be restored by Decay.load_state_dict" in message
    assert "`steps` must be a non-negative integer, got -1" in message


def test_unknown_name_lists_the_registered_ones(tmp_path, registered, capsys):
    listed = "'norm', 'agc', 'autoclip', 'zclip', 'halve', 'decay'"
    with pytest.raises(ValueError, match=f"`clip_algorithm` must be one of {listed}, got 'quarter'"):
        GradTrainingArguments(str(tmp_path), report_to="none", clip_algorithm="quarter")
    parser = HfArgumentParser(GradTrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--clip_algorithm", "quarter"])
    error = capsys.readouterr().err
    assert "invalid choice: 'quarter'" in error and listed in error


def test_registered_name_parses_from_the_command_line(tmp_path, registered):
    parser = HfArgumentParser(GradTrainingArguments)  # built after registering ...
    (cli,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--clip_algorithm", "halve"])
    assert cli.clip_algorithm == "halve"
    assert "halve" in parser.format_help()
    assert GradTrainingArguments(str(tmp_path), report_to="none", clip_algorithm="decay").clip_algorithm == "decay"


def test_registering_later_reaches_a_parser_built_before(tmp_path):
    parser = HfArgumentParser(GradTrainingArguments)
    register_clip_algorithm("halve")(Halve)
    try:
        (cli,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--clip_algorithm", "halve"])
        assert cli.clip_algorithm == "halve"
    finally:
        unregister_clip_algorithm("halve")


def test_registration_is_refused_when_ambiguous(registered):
    with pytest.raises(ValueError, match="'halve' is already registered"):
        register_clip_algorithm("halve")(Decay)
    register_clip_algorithm("halve")(Halve)  # the same class again: nothing changes
    register_clip_algorithm("halve", replace=True)(Decay)
    register_clip_algorithm("halve", replace=True)(Halve)
    for name in RESERVED_NAMES:
        with pytest.raises(ValueError, match=f"{name!r} cannot name a clip algorithm"):
            register_clip_algorithm(name)(Decay)
    assert set(RESERVED_NAMES) == set(COMPONENT_CHECKS)  # the other entries of the state file
    with pytest.raises(TypeError, match="takes a ClipAlgorithm subclass"):
        register_clip_algorithm("plain")(object)
    with pytest.raises(ValueError, match="non-empty string"):
        register_clip_algorithm("")


def test_engines_that_clip_themselves_refuse_a_registered_algorithm(registered):
    for engine, name in [
        ({"deepspeed": "ds.json"}, "DeepSpeed"),
        ({"fsdp": "full_shard", "fsdp_config": {"version": 1}}, "FSDP1"),
    ]:
        with pytest.raises(ValueError, match=f"`clip_algorithm` not supported with {name}"):
            check_engine_support(SimpleNamespace(**engine, clip_algorithm="halve"))
    check_engine_support(SimpleNamespace(fsdp="full_shard", fsdp_config={"version": 2}, clip_algorithm="halve"))


def test_nonfinite_guard_decides_on_the_norms_before_the_algorithm(registered):
    layer = torch.nn.Linear(2, 1)
    layer.weight.grad, layer.bias.grad = torch.tensor([[math.inf, 1.0]]), torch.tensor([0.0])
    result = clip_by(Halve(), layer.named_parameters())
    assert math.isinf(result.param_norms[0].item())  # what `skip_nonfinite_grads` reads


def readme_registry_snippet() -> str:
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("```python\nfrom hf_gradtools import ClipAlgorithm, GradTrainer")
    return text[start + len("```python\n") : text.index("\n```", start)]


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, single_thread):
    monkeypatch.chdir(tmp_path)  # the snippet trains into "out"
    scope = {"model": tiny_classifier(), "train": classification_data(24)}
    try:
        exec(compile(readme_registry_snippet(), "README.md", "exec"), scope)
    finally:
        unregister_clip_algorithm("sign")
    trainer = scope["trainer"]
    first = trainer.state.log_history[0]
    assert first["sign_steps"] == 1 and first["grad_norm"] > 0
    assert [h["sign_steps"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3]
