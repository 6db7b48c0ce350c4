"""The spike guard (`skip_spike_steps`): a step whose loss or gradient norm spikes is skipped (parameters, AdamW state
and scheduler untouched), no normal step is, the warning names the layer group that spiked, and a resume continues
with the same history."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import transformers as T

from hf_gradtools import DamagedCheckpointError, GradTrainer, GradTrainingArguments, LossSpikeError
from hf_gradtools.guards import SkipSpikes, SpikeHistory
from tests.conftest import classification_data, tiny_classifier, torchrun

SPIKE = 14


class SpikeAt(GradTrainer):
    """Multiplies the training loss (or one layer's gradient) by `factor` at the optimizer steps in `spikes`."""

    spikes: tuple[int, ...] = (SPIKE,)
    factor = 1000.0
    layer_param: str | None = None  # spike this parameter's gradient instead of the loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        result = super().compute_loss(model, inputs, *args, **kwargs)
        if not model.training or self.state.global_step + 1 not in self.spikes:
            return result
        if self.layer_param is not None:
            param = dict(model.named_parameters())[self.layer_param]
            handle = param.register_hook(lambda g: g * self.factor)
            self._handles = [*getattr(self, "_handles", []), handle]
            return result
        if kwargs.get("return_outputs"):
            return result[0] * self.factor, result[1]
        return result * self.factor

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []
        return loss


class Recorder(T.TrainerCallback):
    """Parameters, AdamW state and the scheduler's position after every optimizer step."""

    def __init__(self):
        self.params, self.states, self.positions = {}, {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        step = state.global_step
        self.params[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.states[step] = copy.deepcopy(optimizer.optimizer.state_dict()["state"])
        self.positions[step] = lr_scheduler.last_epoch


def spike_args(tmp_path, **overrides) -> GradTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=20,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
        skip_spike_steps=True,
        spike_window=16,
        spike_min_history=8,
    )
    return GradTrainingArguments(**{**settings, **overrides})


def train_logs(trainer) -> list[dict]:
    return [log for log in trainer.state.log_history if "loss" in log]


def test_a_loss_spike_is_skipped_and_no_normal_step_is(tmp_path, caplog, single_thread):
    recorder = Recorder()
    trainer = SpikeAt(
        model=tiny_classifier(), args=spike_args(tmp_path), train_dataset=classification_data(80), callbacks=[recorder]
    )
    with caplog.at_level(logging.WARNING, logger="hf_gradtools"):
        trainer.train()
    skips = [log["spike_skips"] for log in train_logs(trainer)]
    assert skips == [0] * (SPIKE - 1) + [1] * (20 - SPIKE + 1)
    before, after = SPIKE - 1, SPIKE
    for name, value in recorder.params[before].items():
        assert torch.equal(recorder.params[after][name], value), name
    for key, state in recorder.states[before].items():
        for field, value in state.items():
            assert torch.equal(recorder.states[after][key][field], value), (key, field)
    assert recorder.positions[after] == recorder.positions[before]  # the scheduler did not step
    assert recorder.positions[after + 1] == recorder.positions[before] + 1
    assert not torch.equal(
        recorder.params[after + 1]["classifier.weight"], recorder.params[after]["classifier.weight"]
    )
    warnings = [r.getMessage() for r in caplog.records if "skipped as a spike" in r.getMessage()]
    assert len(warnings) == 1 and f"step {SPIKE} skipped as a spike: loss" in warnings[0]
    guard = trainer.component(SkipSpikes)
    # The last `spike_window` steps that were not skipped: the spike is not among them.
    assert len(guard.history.values) == 16 and max(loss for loss, _ in guard.history.values) < 1.0


def test_the_warning_names_the_layer_whose_gradient_spiked(tmp_path, caplog, single_thread):
    trainer = SpikeAt(
        model=tiny_classifier(), args=spike_args(tmp_path, max_steps=SPIKE), train_dataset=classification_data(80)
    )
    trainer.layer_param, trainer.factor = "bert.encoder.layer.1.output.dense.weight", 1e4
    with caplog.at_level(logging.WARNING, logger="hf_gradtools"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "skipped as a spike" in r.getMessage()]
    assert len(warnings) == 1
    assert f"step {SPIKE} skipped as a spike: grad_norm" in warnings[0]
    assert "grew most: layer.1." in warnings[0]
    assert train_logs(trainer)[-1]["spike_skips"] == 1


def test_the_threshold_is_mean_plus_sigma_population_std_of_the_kept_steps():
    history = SpikeHistory(window=3, sigma=2.0, min_history=2)
    history.add([1.0, 10.0])
    assert history.threshold(0) is None and history.exceeds([100.0, 100.0]) is None  # too little history
    history.add([3.0, 10.0])
    assert history.threshold(0) == pytest.approx(2.0 + 2.0 * 1.0)
    assert history.exceeds([4.0, 10.0]) is None and history.exceeds([4.01, 10.0]) == 0
    assert history.exceeds([1.0, 10.0 + 1e-9]) == 1  # a constant history: any larger value is a spike
    for value in (5.0, 7.0):
        history.add([value, 10.0])
    assert [row[0] for row in history.values] == [3.0, 5.0, 7.0]  # the last `window` steps
    assert history.exceeds([math.nan, 10.0]) is None


def test_consecutive_spikes_stop_training_at_max_spike_skips(tmp_path, single_thread):
    trainer = SpikeAt(
        model=tiny_classifier(), args=spike_args(tmp_path, max_spike_skips=2), train_dataset=classification_data(80)
    )
    trainer.spikes = (12, 13)
    with pytest.raises(LossSpikeError, match="2 optimizer steps in a row .* `max_spike_skips`=2"):
        trainer.train()
    assert trainer.state.global_step == 12


def test_a_resumed_run_continues_with_the_same_history(tmp_path, single_thread):
    data = classification_data(80)
    full = SpikeAt(model=tiny_classifier(), args=spike_args(tmp_path / "full"), train_dataset=data)
    full.train()
    args = spike_args(tmp_path / "cut", save_strategy="steps", save_steps=10)
    first = SpikeAt(model=tiny_classifier(), args=args, train_dataset=data)
    first.train()
    resumed = SpikeAt(model=tiny_classifier(), args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-10"))
    a, b = full.component(SkipSpikes), resumed.component(SkipSpikes)
    assert b.skips == a.skips == 1
    for kept, uninterrupted in zip(b.history.values, a.history.values, strict=True):
        assert kept == pytest.approx(uninterrupted, rel=1e-5)
    assert [log["spike_skips"] for log in train_logs(resumed)] == [log["spike_skips"] for log in train_logs(full)]


def test_a_damaged_spike_guard_state_is_refused(tmp_path, single_thread):
    import json
    import os

    args = spike_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)
    SpikeAt(model=tiny_classifier(), args=args, train_dataset=classification_data(40)).train()
    state_file = os.path.join(args.output_dir, "checkpoint-4", "hf_gradtools_state.json")
    with open(state_file) as f:
        state = json.load(f)
    assert len(state["spike_guard"]["losses"]) == 4
    state["spike_guard"]["grad_norms"] = [1.0]
    with open(state_file, "w") as f:
        json.dump(state, f)
    again = SpikeAt(
        model=tiny_classifier(), args=spike_args(tmp_path, max_steps=6), train_dataset=classification_data(40)
    )
    with pytest.raises(DamagedCheckpointError, match="spike_guard.grad_norms"):
        again.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-4"))


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("spike_window", 0, "a positive integer"),
        ("spike_sigma", 0.0, "a finite positive number"),
        ("spike_sigma", float("inf"), "a finite positive number"),
        ("spike_min_history", 200, "at most `spike_window`"),
        ("max_spike_skips", 0, "a positive integer"),
    ],
)
def test_bad_values_are_refused_naming_the_field(tmp_path, field, value, allowed):
    with pytest.raises(ValueError, match=rf"`{field}`.*{allowed}"):
        spike_args(tmp_path, **{field: value})


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("decided", ["on the host", "on the device"])
def test_two_processes_skip_together_when_one_rank_spikes(tmp_path, decided):
    prefix = str(tmp_path / "out" / "result")
    torchrun(tmp_path, "ddp_spike.py", prefix, *(["device"] if decided == "on the device" else []))
    ranks = [torch.load(f"{prefix}.{rank}.pt") for rank in (0, 1)]
    for result in ranks:
        assert result["skips"] == [0] * 7 + [1] * 3  # step 8 skipped on both, no other step
        assert result["spike_on_device"] is (decided == "on the device")
        assert result["begun"][8] == result["begun"][7]  # the scheduler did not step at step 8 (as step 9 began)
        if decided == "on the host":
            assert result["positions"][7] == result["positions"][6]  # nor before the log read it
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), f"{name} differs between the ranks"
