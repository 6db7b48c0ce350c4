"""Skip-on-spike with its decisions kept on the device: the same skips, parameters, optimizer state and schedule as
the host's decisions, with no host read inside an optimizer step (a `TorchDispatchMode` stands in for CUDA's sync
check on this CPU: every `.item()`, `bool()`, `float()` and `nonzero` goes through it, and `tolist` is counted)."""

from __future__ import annotations

import copy
import logging
import random
import re

import pytest
import torch
import transformers as T
from torch.utils._python_dispatch import TorchDispatchMode

from hf_gradtools import GradTrainer, LossSpikeError
from hf_gradtools.components import TrainerComponent
from hf_gradtools.guards import SkipSpikes, SpikeHistory, device_decision, has_fresh_state
from hf_gradtools.guards.spike_device import DeviceSpikeHistory, growth_leader
from tests.conftest import classification_data, tiny_classifier
from tests.guards.test_spike_guard import SPIKE, SpikeAt, spike_args, train_logs

READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)


class HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value back to the host."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class CountReads(SpikeAt):
    """Counts host reads in each optimizer step's own work: the micro-batches, the clipping and the guards'
    decision, and the optimizer's step (the logs and checkpoints, where the decisions are read, are outside)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: dict[int, int] = {}
        self.add_callback(OptimizerReads(self))

    def _counted(self, work, *args, **kwargs):
        mode = HostReads()
        with mode:
            result = work(*args, **kwargs)
        step = self.state.global_step + 1
        self.reads[step] = self.reads.get(step, 0) + mode.count
        return result

    def training_step(self, *args, **kwargs):
        return self._counted(super().training_step, *args, **kwargs)

    def _clip_and_record(self):
        return self._counted(super()._clip_and_record)


class OptimizerReads(T.TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.mode = trainer, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.mode = HostReads()
        self.mode.__enter__()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.mode.__exit__(None, None, None)
        reads = self.trainer.reads
        reads[state.global_step + 1] = reads.get(state.global_step + 1, 0) + self.mode.count


class Steps(T.TrainerCallback):
    """Parameters and optimizer state after every optimizer step, the rate it used, and the scheduler's position
    as the next step begins (after the step's log, where a decision kept on the device is read)."""

    def __init__(self):
        self.params, self.states, self.positions, self.rates = {}, {}, {}, {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.positions[state.global_step] = lr_scheduler.last_epoch

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = state.global_step
        self.params[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.states[step] = copy.deepcopy(optimizer.optimizer.state_dict()["state"])


@pytest.fixture
def on_device(monkeypatch):
    def decide(value: bool):
        monkeypatch.setattr(SkipSpikes, "decide_on_device", value)

    return decide


@pytest.fixture(autouse=True)
def count_tolist(monkeypatch):
    """`tolist` reads the whole tensor back without a dispatched op: count it in an active `HostReads` too."""
    original = torch.Tensor.tolist

    def tolist(self):
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        for mode in _get_current_dispatch_mode_stack():
            if isinstance(mode, HostReads):
                mode.count += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)


def run(tmp_path, name, device: bool, on_device, spikes=(SPIKE,), **overrides):
    on_device(device)
    steps = Steps()
    args = spike_args(tmp_path / name, optim="adamw_torch_fused", logging_nan_inf_filter=False, **overrides)
    trainer = CountReads(model=tiny_classifier(), args=args, train_dataset=classification_data(80), callbacks=[steps])
    trainer.spikes = spikes
    return trainer, steps


@pytest.mark.parametrize("clip", [{}, {"clip_algorithm": "zclip", "zclip_warmup_steps": 5}], ids=["norm", "zclip"])
def test_decisions_on_the_device_equal_the_hosts_and_read_nothing_back_within_a_step(
    tmp_path, on_device, caplog, single_thread, clip
):
    host, host_steps = run(tmp_path, "host", False, on_device, **clip)
    host.train()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_gradtools"):
        device, device_steps = run(tmp_path, "device", True, on_device, **clip)
        device.train()
    assert device.component(SkipSpikes)._on_device and not host.component(SkipSpikes)._on_device
    # The same run, step for step: the skipped step leaves everything as it was, the scheduler included.
    for step in host_steps.params:
        for name, value in host_steps.params[step].items():
            assert torch.equal(device_steps.params[step][name], value), (step, name)
        for key, state in host_steps.states[step].items():
            for field, value in state.items():
                assert torch.equal(device_steps.states[step][key][field], value), (step, key, field)
    assert device_steps.positions == host_steps.positions
    assert device_steps.positions[SPIKE] == device_steps.positions[SPIKE - 1]
    for name, value in device_steps.params[SPIKE - 1].items():
        assert torch.equal(device_steps.params[SPIKE][name], value), name
    assert [log["spike_skips"] for log in train_logs(device)] == [log["spike_skips"] for log in train_logs(host)]
    assert [log["spike_skips"] for log in train_logs(device)][SPIKE - 2 : SPIKE] == [0, 1]
    warnings = [r.getMessage() for r in caplog.records if "skipped as a spike" in r.getMessage()]
    assert len(warnings) == 1 and f"step {SPIKE} skipped as a spike: loss" in warnings[0]
    kept_rows, host_rows = (t.component(SkipSpikes).history_rows()[0] for t in (device, host))
    for kept, hosts in zip(kept_rows, host_rows, strict=True):
        assert kept == pytest.approx(hosts, rel=1e-12)
    # No host read inside any optimizer step on the device but the first (whose optimizer state is created: its
    # decision is the host's); the host's decision reads at every step.
    assert device.reads[1] == 1 and {count for step, count in device.reads.items() if step > 1} == {0}, device.reads
    assert all(count >= 1 for count in host.reads.values()), host.reads


def test_between_logs_the_rate_runs_ahead_until_the_read_sets_the_scheduler_back(tmp_path, on_device, single_thread):
    host, host_steps = run(tmp_path, "host", False, on_device, logging_steps=5)
    host.train()
    device, device_steps = run(tmp_path, "device", True, on_device, logging_steps=5)
    device.train()
    # The spike (step 14) is skipped exactly: nothing changes across it.
    for name, value in device_steps.params[SPIKE - 1].items():
        assert torch.equal(device_steps.params[SPIKE][name], value), name
    for key, state in device_steps.states[SPIKE - 1].items():
        for field, value in state.items():
            assert torch.equal(device_steps.states[SPIKE][key][field], value), (key, field)
    # Step 15 (the next log reads the skip) used the rate one position ahead; from step 16 on, the host's rates.
    assert device_steps.positions[SPIKE] == host_steps.positions[SPIKE] + 1
    assert device_steps.positions[15] == host_steps.positions[15]
    assert device_steps.rates[15] == host_steps.rates[16] != host_steps.rates[15]
    assert [device_steps.rates[s] for s in range(16, 21)] == [host_steps.rates[s] for s in range(16, 21)]
    assert [log["spike_skips"] for log in train_logs(device)] == [0, 0, 1, 1]
    assert {count for step, count in device.reads.items() if step > 1} == {0}, device.reads


def test_consecutive_skips_on_the_device_stop_training_at_the_read(tmp_path, on_device, single_thread):
    trainer, _ = run(tmp_path, "device", True, on_device, spikes=(12, 13), max_spike_skips=2, logging_steps=5)
    with pytest.raises(LossSpikeError, match=r"2 optimizer steps in a row .*up to step 13.* `max_spike_skips`=2") as e:
        trainer.train()
    assert trainer.state.global_step == 15  # the read at the log of step 15
    assert "read at step 15: 0 skipped in a row by then" in str(e.value)


def test_a_resumed_run_on_the_device_continues_with_the_same_history(tmp_path, on_device, single_thread):
    full, full_steps = run(tmp_path, "full", True, on_device, logging_steps=5)
    full.train()
    # The checkpoint at step 15 comes right after the skip at step 14: the save reads the decision first.
    first, _ = run(tmp_path, "cut", True, on_device, logging_steps=5, save_strategy="steps", save_steps=15)
    first.train()
    resumed, resumed_steps = run(
        tmp_path, "cut", True, on_device, logging_steps=5, save_strategy="steps", save_steps=15
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-15"))
    a, b = full.component(SkipSpikes), resumed.component(SkipSpikes)
    assert b.skips == a.skips == 1
    for kept, uninterrupted in zip(b.history_rows()[0], a.history_rows()[0], strict=True):
        assert kept == pytest.approx(uninterrupted, rel=1e-5)
    assert [resumed_steps.positions[s] for s in range(15, 20)] == [full_steps.positions[s] for s in range(15, 20)]
    assert [resumed_steps.rates[s] for s in range(16, 21)] == [full_steps.rates[s] for s in range(16, 21)]
    for name, value in full_steps.params[20].items():
        torch.testing.assert_close(resumed_steps.params[20][name], value, rtol=1e-5, atol=1e-6)


def test_an_optimizer_without_a_skip_flag_keeps_the_hosts_decision_and_says_why(
    tmp_path, on_device, caplog, single_thread
):
    on_device(True)
    args = spike_args(tmp_path, optim="adamw_torch", max_steps=SPIKE)
    trainer = SpikeAt(model=tiny_classifier(), args=args, train_dataset=classification_data(80))
    with caplog.at_level(logging.INFO, logger="hf_gradtools"):
        trainer.train()
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "reads its decision back at each optimizer step" in m and "AdamW" in m and "adamw_torch_fused" in m
        for m in messages
    )
    assert not trainer.component(SkipSpikes)._on_device and train_logs(trainer)[-1]["spike_skips"] == 1


def test_the_device_history_computes_the_hosts_thresholds_and_layer():
    rng = random.Random(0)
    host = SpikeHistory(window=7, sigma=2.5, min_history=3)
    device = DeviceSpikeHistory(2, 7, 2.5, 3, torch.device("cpu"))
    for i in range(20):
        row = [rng.uniform(0.5, 2.0), rng.uniform(1.0, 9.0)]
        keep = i % 4 != 3
        if keep:
            host.add(row)
        device.add(torch.tensor(row, dtype=torch.float64), torch.tensor(keep))
        limits, ready = device.thresholds()
        assert bool(ready) == (host.threshold(0) is not None)
        if ready:
            assert limits.tolist() == pytest.approx([host.threshold(0), host.threshold(1)], rel=1e-12)
        assert device.rows() == [list(r) for r in host.values]
    again = DeviceSpikeHistory.from_rows(device.rows(), 2, 7, 2.5, 3, torch.device("cpu"))
    assert again.rows() == device.rows()
    spiked, which, _ = device.exceeds(torch.tensor([1.0, 100.0]))
    assert bool(spiked) and int(which) == 1
    guard = SkipSpikes(4, 6.0, 2, 10, 2.0)
    guard.group_keys = ["embeddings", "layer.0", "head"]
    for row in ([1.0, 0.0, 2.0], [3.0, 0.0, 2.0]):
        guard.groups.add(row)
    for values in ([2.0, 0.0, 8.0], [2.0, 0.5, 1.0], [float("nan"), 0.0, 1.0]):
        means = torch.tensor([2.0, 0.0, 2.0])
        index = int(growth_leader(torch.tensor(values), means))
        assert guard.group_keys[index] == guard.spike_layer(values), values


class SkipFifth(TrainerComponent):
    """A guard of one's own that decides on the device: it skips optimizer step 5."""

    def should_skip(self, trainer, step):
        return torch.tensor(step.step == 5)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_a_components_device_decision_skips_with_any_optimizer(tmp_path, optim, single_thread):
    steps = Steps()
    args = spike_args(tmp_path, optim=optim, max_steps=8, skip_spike_steps=False, logging_steps=4)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=classification_data(40), callbacks=[steps])
    trainer.add_component(SkipFifth())
    trainer.train()
    for name, value in steps.params[4].items():
        assert torch.equal(steps.params[5][name], value), name
    assert not torch.equal(steps.params[6]["classifier.weight"], steps.params[5]["classifier.weight"])
    # The fused optimizer skips on the device flag, and the log at step 8 sets the scheduler back; the other
    # optimizer gets the host's skip, which holds it at once.
    ahead = int(optim == "adamw_torch_fused")  # until the log at step 8 reads the flag
    assert [steps.positions[s] for s in (4, 5, 7)] == [4, 4 + ahead, 6 + ahead]
    assert trainer.lr_scheduler.last_epoch == 7


def test_without_logs_the_decisions_are_still_read_every_device_read_every_steps(
    tmp_path, on_device, monkeypatch, single_thread
):
    monkeypatch.setattr(GradTrainer, "device_read_every", 4)
    trainer, steps = run(
        tmp_path, "device", True, on_device, spikes=(12, 13), max_spike_skips=2, logging_strategy="no"
    )
    with pytest.raises(LossSpikeError, match=r"2 optimizer steps in a row .*up to step 13"):
        trainer.train()
    # Step 1 is the host's (its optimizer state is created); then 2-5, 6-9 and 10-13 are read as steps 6, 10 and
    # 14 begin their clipping.
    assert trainer.state.global_step == 13
    assert steps.positions[12] == 12  # before any read: the scheduler stepped past the skip at step 12


class SkipFirst(TrainerComponent):
    """Skips the run's first optimizer step, on the device."""

    def should_skip(self, trainer, step):
        return torch.tensor(step.step == 1)


def test_a_first_step_skipped_on_the_device_is_read_on_the_host_so_new_state_is_never_left_unset(
    tmp_path, single_thread
):
    # Fused SGD makes its momentum buffers with `empty_like` at their first step; a kernel skipped on its flag
    # would leave them unset (NaN weights after), so a step that creates state takes the host's decision.
    steps = Steps()
    args = spike_args(tmp_path, max_steps=4, skip_spike_steps=False, logging_steps=4)
    sgd = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "fused": True})
    model = tiny_classifier()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = GradTrainer(
        model=model, args=args, train_dataset=classification_data(16), callbacks=[steps], optimizer_cls_and_kwargs=sgd
    )
    trainer.add_component(SkipFirst())
    trainer.train()
    for name, value in start.items():
        assert torch.equal(steps.params[1][name], value), name  # the first step skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(steps.params[4]["classifier.weight"], start["classifier.weight"])
    assert steps.positions[1] == 0  # held at once by the host's skip
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, fused=True)
    assert has_fresh_state(optimizer, list(layer.parameters()))


@pytest.mark.parametrize("shape", [(1,), (2,)])
def test_a_device_decision_of_another_shape_is_refused_naming_the_component(shape):
    with pytest.raises(TypeError, match=rf"SkipFifth.should_skip returned a tensor of shape {re.escape(str(shape))}"):
        device_decision(SkipFifth(), torch.zeros(shape))
    assert device_decision(SkipFifth(), torch.tensor(2)).dtype == torch.bool
