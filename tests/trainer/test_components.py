"""Components of your own beside the built-in ones: `add_component` hooks, logs and checkpoint state, and a
`GradualUnfreezeCallback` of your own that is kept (not replaced) and trains as `gradual_unfreeze_steps` does."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hf_gradtools import (
    DamagedCheckpointError,
    GradTrainer,
    TrainerComponent,
    freeze_embeddings,
    freeze_first_n_layers,
)
from hf_gradtools.schedules import GradualUnfreezeCallback, GradualUnfreezer, unfreeze_order
from tests.conftest import classification_data, grad_args, tiny_classifier

pytestmark = pytest.mark.usefixtures("single_thread")


class NormRecorder(TrainerComponent):
    """Measures the accumulated gradient's L2 norm before clipping, counts the steps, and keeps the count."""

    name = "norm_recorder"
    every_step = True

    def __init__(self):
        self.steps, self.norms, self.windows = 0, [], 0

    @staticmethod
    def check_state(state):
        if not isinstance(state, dict) or not isinstance(state.get("steps"), int):
            raise ValueError("`steps` must be an integer")
        return state

    def on_window_end(self, trainer):
        self.windows += 1

    def before_clip(self, trainer, step):
        self.norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in step.params])).item())

    def after_clip(self, trainer, step):
        self.steps += 1

    def log_entries(self, trainer):
        return {"recorded_steps": self.steps}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state, trainer):
        self.steps = 0 if state is None else state["steps"]


def test_a_component_of_your_own_gets_the_hooks_the_logs_and_the_checkpoint(tmp_path):
    data = classification_data(32)
    args = grad_args(tmp_path, max_steps=6, gradient_accumulation_steps=2, max_grad_norm=0.1, log_grad_norms=True)
    args.save_strategy, args.save_steps = "steps", 3
    recorder = NormRecorder()
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=data)
    trainer.add_component(recorder)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["recorded_steps"] for log in logs] == [1, 2, 3, 4, 5, 6]
    assert recorder.windows == 6
    # Before clipping (max_grad_norm=0.1 clips every step): the norm the Trainer logs.
    assert recorder.norms == pytest.approx([log["grad_norm"] for log in logs], rel=1e-5)
    assert all(log["grad_norm_post_clip"] == pytest.approx(0.1, rel=1e-4) for log in logs)  # built-ins alongside
    with open(os.path.join(args.output_dir, "checkpoint-3", "hf_gradtools_state.json")) as f:
        assert json.load(f)["norm_recorder"] == {"steps": 3}

    resumed_recorder = NormRecorder()
    resumed = GradTrainer(model=tiny_classifier(), args=args, train_dataset=data)
    resumed.add_component(resumed_recorder)
    resumed.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    assert resumed_recorder.steps == 6 and resumed_recorder.norms == pytest.approx(recorder.norms[3:], rel=1e-5)


def test_a_damaged_entry_of_your_component_is_refused_before_resuming(tmp_path):
    args = grad_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16))
    trainer.add_component(NormRecorder())
    trainer.train()
    state_file = os.path.join(args.output_dir, "checkpoint-2", "hf_gradtools_state.json")
    with open(state_file, "w") as f:
        json.dump({"norm_recorder": {"steps": "two"}}, f)
    again = GradTrainer(
        model=tiny_classifier(), args=grad_args(tmp_path, max_steps=4), train_dataset=classification_data(16)
    )
    again.add_component(NormRecorder())
    with pytest.raises(DamagedCheckpointError, match="norm_recorder"):
        again.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))


def test_resuming_without_a_component_whose_state_was_saved_names_it(tmp_path):
    args = grad_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(16))
    trainer.add_component(NormRecorder())
    trainer.train()
    again = GradTrainer(
        model=tiny_classifier(), args=grad_args(tmp_path, max_steps=4), train_dataset=classification_data(16)
    )
    with pytest.raises(DamagedCheckpointError, match=r"`norm_recorder` is the state of a component .*add_component"):
        again.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))


def test_add_component_takes_only_a_component(tmp_path):
    trainer = GradTrainer(model=tiny_classifier(), args=grad_args(tmp_path))
    with pytest.raises(TypeError, match="takes a TrainerComponent, got dict"):
        trainer.add_component({})


def unfreeze_settings(tmp_path, **fields):
    return grad_args(
        tmp_path, max_steps=8, weight_decay=0.01, lr_scheduler_type="linear", log_grad_norms=True, **fields
    )


def test_your_own_unfreezing_callback_is_kept_and_trains_as_the_built_in_one(tmp_path):
    data = classification_data(40)
    built_in = GradTrainer(
        model=tiny_classifier(),
        args=unfreeze_settings(
            tmp_path / "a", freeze_embeddings=True, freeze_first_n_layers=2, gradual_unfreeze_steps=2
        ),
        train_dataset=data,
    )
    built_in.train()

    model = tiny_classifier()
    frozen = freeze_embeddings(model) + freeze_first_n_layers(model, 2)
    trainer = GradTrainer(model=model, args=unfreeze_settings(tmp_path / "b"), train_dataset=data)
    unfreezer = GradualUnfreezer(
        unfreeze_order(model, frozen),
        2,
        base_lr=trainer.args.learning_rate,
        weight_decay=trainer.args.weight_decay,
        decay_parameter_names=trainer.get_decay_parameter_names(model),
    )
    callback = GradualUnfreezeCallback(unfreezer)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.unfreezer is unfreezer and unfreezer.position == 3  # kept: two blocks, then the embeddings
    for (name, p), q in zip(trainer.model.named_parameters(), built_in.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["unfrozen_blocks"] for log in logs] == [0, 1, 1, 2, 2, 3, 3, 3]
    assert all("grad_norm/head" in log for log in logs)


def test_your_own_unfreezer_and_gradual_unfreeze_steps_are_refused_together(tmp_path):
    model = tiny_classifier()
    frozen = freeze_embeddings(model)
    args = unfreeze_settings(tmp_path, freeze_embeddings=True, gradual_unfreeze_steps=2)
    trainer = GradTrainer(model=model, args=args, train_dataset=classification_data(16))
    trainer.add_callback(GradualUnfreezeCallback(GradualUnfreezer(unfreeze_order(model, frozen), 2, base_lr=1e-2)))
    with pytest.raises(ValueError, match="would unfreeze the same blocks twice"):
        trainer.train()


def test_a_guard_of_your_own_runs_without_every_step(tmp_path):
    """Overriding `should_skip` is enough: the step hooks run at default settings too."""

    class SkipStepTwo(TrainerComponent):
        asked = 0

        def should_skip(self, trainer, step):
            self.asked += 1
            return step.step == 2

    guard = SkipStepTwo()
    trainer = GradTrainer(
        model=tiny_classifier(), args=grad_args(tmp_path, max_steps=3), train_dataset=classification_data(16)
    )
    trainer.add_component(guard)
    trainer.train()
    assert guard.asked == 3
