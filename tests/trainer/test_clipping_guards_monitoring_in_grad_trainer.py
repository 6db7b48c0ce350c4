"""Clip algorithms, guards and monitoring wired into GradTrainer: AGC and AutoClip against hand-written loops, the
non-finite guard, per-layer norms in the logs (and in a TensorBoard event file), gradient tensors on disk, the
dead-parameter report, and resume."""

from __future__ import annotations

import glob
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
import transformers as T

from hf_gradtools import GradTrainer, load_grad_snapshots
from hf_gradtools.clipping.component import GradientClipping
from hf_gradtools.guards import NonFiniteGradientError
from tests.conftest import classification_data, grad_args, tiny_classifier, torchrun
from tests.monitoring.test_monitoring import by_hand

HEAD = ("classifier.weight", "classifier.bias")


def autoclip_history(trainer) -> list[float]:
    """The norms AutoClip kept in the trainer's last run."""
    return trainer.component(GradientClipping).algorithm(None).autoclip.history


def rows(data, start, stop):
    return {k: torch.tensor(data[start:stop][k]) for k in data.column_names}


def hand_loop(model, data, clip, *, batch, accumulation, steps, lr):
    """loss / N, backward, `clip(model)`, AdamW step, zero: what users write by hand."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for micro in range(accumulation):
            start = (step * accumulation + micro) * batch
            (model(**rows(data, start, start + batch)).loss / accumulation).backward()
        clip(model)
        optimizer.step()
        optimizer.zero_grad()
    return model


def hand_agc(model, factor, eps, exclude):
    """AGC by hand: each output row (whole tensor for 1-D) to at most `factor * max(||W_row||, eps)`."""
    for name, p in model.named_parameters():
        if p.grad is None or name in exclude:
            continue
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        w = p.detach().norm(dim=dims, keepdim=True) if dims else p.detach().norm()
        g = p.grad.norm(dim=dims, keepdim=True) if dims else p.grad.norm()
        bound = w.clamp_min(eps) * factor
        p.grad.mul_(torch.where(g > bound, bound / g, torch.ones_like(g)))


class HandAutoClip:
    def __init__(self, percentile):
        self.percentile, self.history = percentile, []

    def __call__(self, model):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        self.history.append(norm)
        threshold = float(np.percentile(self.history, self.percentile))
        coef = min(1.0, threshold / (norm + 1e-6))
        for g in grads:
            g.mul_(coef)


def train_settings(args_factory, **fields):
    settings = dict(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
    )
    return args_factory(**{**settings, **fields})


def assert_same_parameters(model, expected):
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_agc_run_equals_hand_loop(args_factory, single_thread):
    data = classification_data(24)
    expected = hand_loop(
        tiny_classifier(), data, lambda m: hand_agc(m, 0.01, 1e-3, HEAD), batch=4, accumulation=2, steps=3, lr=1e-2
    )
    args = train_settings(args_factory, clip_algorithm="agc", log_grad_norms=True)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=data)
    trainer.train()
    coefs = [h["clip_coef"] for h in trainer.state.log_history if "clip_coef" in h]
    assert len(coefs) == 3 and all(c < 0.95 for c in coefs), "AGC must clip in this test"
    assert_same_parameters(trainer.model, expected)


def test_autoclip_run_equals_hand_loop(args_factory, single_thread):
    data = classification_data(32)
    hand = HandAutoClip(50.0)
    expected = hand_loop(tiny_classifier(), data, hand, batch=4, accumulation=2, steps=4, lr=1e-2)
    args = train_settings(args_factory, clip_algorithm="autoclip", autoclip_percentile=50.0, max_steps=4)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=data)
    trainer.train()
    assert autoclip_history(trainer) == pytest.approx(hand.history, rel=1e-5)
    assert_same_parameters(trainer.model, expected)


class Snapshotter(T.TrainerCallback):
    """Parameters, optimizer state, scheduler position and learning rate after each optimizer step."""

    def __init__(self):
        self.steps = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        opt_state = optimizer.state_dict()["state"]
        self.steps[state.global_step] = {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "opt": {k: {n: v.clone() for n, v in s.items()} for k, s in opt_state.items()},
            "sched": lr_scheduler.last_epoch,
        }


def nan_on(trainer_box, bad_steps):
    """A gradient hook that puts one NaN in `classifier.weight`'s gradient during the given optimizer steps."""

    def hook(grad):
        if trainer_box[0].state.global_step + 1 in bad_steps:
            grad = grad.clone()
            grad[0, 0] = math.nan
        return grad

    return hook


def test_nonfinite_step_is_skipped_and_training_goes_on(args_factory, caplog, single_thread):
    data = classification_data(16)
    model = tiny_classifier()
    box = []
    model.classifier.weight.register_hook(nan_on(box, {2}))
    snap = Snapshotter()
    args = args_factory(
        max_steps=4,
        skip_nonfinite_grads=True,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        grad_snapshot_steps=1,
    )
    trainer = GradTrainer(model=model, args=args, train_dataset=data, callbacks=[snap])
    box.append(trainer)
    with caplog.at_level(logging.WARNING, logger="hf_gradtools"):
        trainer.train()

    assert trainer.state.global_step == 4
    one, two, three = snap.steps[1], snap.steps[2], snap.steps[3]
    for name, value in one["params"].items():
        assert torch.equal(two["params"][name], value), f"{name} changed at the skipped step"
        assert torch.isfinite(three["params"][name]).all()
    assert not torch.equal(three["params"]["classifier.weight"], two["params"]["classifier.weight"])
    for key, state in one["opt"].items():
        for field, value in state.items():
            assert torch.equal(two["opt"][key][field], value), f"optimizer state {key}.{field} changed"
    assert [snap.steps[s]["sched"] for s in (1, 2, 3, 4)] == [1, 1, 2, 3]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["nonfinite_skips"] for h in logs] == [0, 1, 1, 1]
    rates = [h["learning_rate"] for h in logs]  # the rate each step used: step 3 uses step 2's
    assert rates[0] > rates[1] == rates[2] > rates[3]
    messages = [r.getMessage() for r in caplog.records if "Skipped optimizer step" in r.getMessage()]
    assert messages == [
        "Skipped optimizer step 2: non-finite (NaN/Inf) gradients in classifier.weight (1 skipped so far)."
    ]
    snapshots = {s["step"]: s for s in load_grad_snapshots(args.output_dir)}
    assert [step for step, s in snapshots.items() if s.get("skipped")] == [2]


def test_consecutive_nonfinite_steps_stop_training(args_factory, single_thread):
    data = classification_data(16)
    model = tiny_classifier()
    box = []
    model.classifier.weight.register_hook(nan_on(box, {2, 3, 4}))
    args = args_factory(max_steps=4, skip_nonfinite_grads=True, max_nonfinite_skips=2)
    trainer = GradTrainer(model=model, args=args, train_dataset=data)
    box.append(trainer)
    with pytest.raises(NonFiniteGradientError, match=r"2 consecutive optimizer steps \(2 to 3\)") as error:
        trainer.train()
    assert "training stopped at step 3" in str(error.value) and "classifier.weight" in str(error.value)
    assert trainer.state.global_step == 2


def hand_group_norms(model, data, batch):
    model(**rows(data, 0, batch)).loss.backward()
    return by_hand(model, 2.0)  # the groups by literal name prefixes, as test_monitoring checks them


def test_per_layer_norms_and_clip_coef_in_logs(args_factory, single_thread):
    data = classification_data(8)
    expected = hand_group_norms(tiny_classifier(), data, 8)
    args = args_factory(per_device_train_batch_size=8, max_steps=1, max_grad_norm=0.05, log_grad_norms=True)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=data)
    trainer.train()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert sorted(k for k in log if k.startswith("grad_norm/")) == sorted(expected)
    assert len(expected) == 5  # embeddings, 3 layers, head
    for key, value in expected.items():
        assert log[key] == pytest.approx(value, rel=1e-5), key
    pre, post = log["grad_norm"], log["grad_norm_post_clip"]
    assert pre > 0.05 and post == pytest.approx(0.05, rel=1e-4)
    assert log["clip_coef"] == pytest.approx(post / pre, rel=1e-6)
    assert "nonfinite_skips" not in log


def test_per_layer_norms_reach_tensorboard(args_factory, single_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = classification_data(16)
    args = args_factory(max_steps=2, log_grad_norms=True, report_to="tensorboard")
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=data)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    (event_file,) = glob.glob(os.path.join(args.output_dir, "**", "events.out.tfevents.*"), recursive=True)
    events = EventAccumulator(event_file)
    events.Reload()
    tags = events.Tags()["scalars"]
    for key in ("grad_norm/embeddings", "grad_norm/layer.0", "grad_norm/layer.2", "grad_norm/head", "clip_coef"):
        assert f"train/{key}" in tags, sorted(tags)
        written = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert written == [(h["step"], pytest.approx(h[key], rel=1e-6)) for h in logs]


def test_saved_gradient_tensors_equal_accumulated_gradient(args_factory, single_thread):
    data = classification_data(8)
    reference = tiny_classifier()
    reference(**rows(data, 0, 8)).loss.backward()  # one batch of 8 = 2 micro-batches of 4, accumulated exactly
    chosen = [r"^classifier\.", r"layer\.2\.output\.dense\.weight$"]
    args = args_factory(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=1,
        max_grad_norm=0.01,
        grad_snapshot_steps=1,
        grad_snapshot_tensors=chosen,
    )
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=data)
    trainer.train()
    snapshots = load_grad_snapshots(args.output_dir)
    assert snapshots[0]["total_norm_pre_clip"] > 0.01  # clipping ran: the saved tensors are from before it
    tensors = snapshots.tensors(1)
    names = ["bert.encoder.layer.2.output.dense.weight", "classifier.weight", "classifier.bias"]
    assert list(tensors) == names
    grads = dict(reference.named_parameters())
    for name in names:
        torch.testing.assert_close(tensors[name], grads[name].grad, rtol=0, atol=1e-6, msg=name)


def test_dead_parameter_is_reported(args_factory, caplog, single_thread):
    model = tiny_classifier()
    model.register_parameter("unused_scale", torch.nn.Parameter(torch.ones(1)))
    args = args_factory(max_steps=2, freeze_embeddings=True)
    trainer = GradTrainer(model=model, args=args, train_dataset=classification_data(8))
    with caplog.at_level(logging.WARNING, logger="hf_gradtools"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "received no gradient" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith("graph cut by .detach()?): unused_scale")
    with open(os.path.join(args.output_dir, "frozen_parameters.json")) as f:
        assert json.load(f)["no_grad"] == ["unused_scale"]


def test_resume_continues_autoclip_history(tmp_path, single_thread):
    data = classification_data(24)
    common = dict(
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        clip_algorithm="autoclip",
        autoclip_percentile=25.0,
        skip_nonfinite_grads=True,
        optim="adamw_torch",
    )
    full = GradTrainer(
        model=tiny_classifier(),
        args=grad_args(tmp_path / "full", save_strategy="steps", save_steps=2, **common),
        train_dataset=data,
    )
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    with open(checkpoint / "hf_gradtools_state.json") as f:
        saved = json.load(f)
    assert len(saved["autoclip"]["history"]) == 2
    assert saved["nonfinite_guard"]["nonfinite_skips"] == 0

    resumed = GradTrainer(model=tiny_classifier(seed=5), args=grad_args(tmp_path / "re", **common), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert autoclip_history(resumed) == pytest.approx(autoclip_history(full), rel=1e-6)
    assert len(autoclip_history(resumed)) == 4
    assert_same_parameters(resumed.model, full.model)


def test_defaults_change_nothing(tmp_path, single_thread):
    """A default GradTrainer logs the same keys and numbers as the Trainer, and saves no extra file."""
    data = classification_data(16)
    settings = dict(max_steps=2, save_strategy="steps", save_steps=2, optim="adamw_torch")
    grad = GradTrainer(model=tiny_classifier(), args=grad_args(tmp_path / "g", **settings), train_dataset=data)
    grad.train()
    plain_args = T.TrainingArguments(
        output_dir=str(tmp_path / "p" / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
        **settings,
    )
    plain = T.Trainer(model=tiny_classifier(), args=plain_args, train_dataset=data)
    plain.train()
    drop = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    assert [{k: v for k, v in h.items() if k not in drop} for h in grad.state.log_history] == [
        {k: v for k, v in h.items() if k not in drop} for h in plain.state.log_history
    ]
    grad_files = sorted(os.listdir(tmp_path / "g" / "out" / "checkpoint-2"))
    assert grad_files == sorted(os.listdir(tmp_path / "p" / "out" / "checkpoint-2"))


def test_patterns_matching_nothing_fail_before_training(args_factory):
    args = args_factory(grad_snapshot_steps=1, grad_snapshot_tensors=["no_such_parameter"])
    with pytest.raises(ValueError, match="`grad_snapshot_tensors` pattern 'no_such_parameter' matches no parameter"):
        GradTrainer(model=tiny_classifier(), args=args)
    assert not os.path.exists(args.output_dir)
    args = args_factory(clip_algorithm="agc", agc_exclude=["heads?$"])
    with pytest.raises(ValueError, match="`agc_exclude` pattern"):
        GradTrainer(model=tiny_classifier(), args=args)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_skip_together_when_one_rank_has_a_nan(tmp_path):
    prefix = str(tmp_path / "out" / "result")
    torchrun(tmp_path, "ddp_nonfinite.py", prefix)
    ranks = [torch.load(f"{prefix}.{rank}.pt") for rank in (0, 1)]
    for result in ranks:
        assert result["positions"] == [1, 1, 2, 3]  # the scheduler did not step at step 2, on either rank
        assert result["skips"] == [0, 1, 1, 1]
        assert result["global_step"] == 4
    for name, value in ranks[0]["state"].items():
        assert torch.equal(ranks[1]["state"][name], value), f"{name} differs between the ranks"


@pytest.mark.parametrize("with_scaler", [False, True])
def test_skipped_optimizer_step_reports_itself_and_the_next_one_runs(with_scaler):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from hf_gradtools.guards import skip_optimizer_step

    Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if with_scaler else None
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]

    def backward():
        loss = model(torch.ones(1, 2)).sum()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer.optimizer)

    backward()
    skip_optimizer_step(optimizer)
    optimizer.step()
    assert optimizer.step_was_skipped
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert scaler is None or scaler.get_scale() == 512.0  # backed off, as for an fp16 overflow
    optimizer.zero_grad()
    backward()
    optimizer._is_overflow = False  # what GradInsight does before the next step's decision
    optimizer.step()
    assert not optimizer.step_was_skipped
    assert not torch.equal(before[0], model.weight)


def test_fields_parse_from_command_line_and_json(tmp_path):
    from transformers import HfArgumentParser

    from hf_gradtools import GradTrainingArguments

    parser = HfArgumentParser(GradTrainingArguments)
    (cli,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--clip_algorithm", "agc", "--agc_clip_factor", "0.02", "--agc_exclude"]
        + ["^classifier\\.", "pooler", "--skip_nonfinite_grads", "--max_nonfinite_skips", "3", "--log_grad_norms"]
        + ["--grad_snapshot_tensors", "layer\\.2\\.", "--autoclip_percentile", "25", "--report_to", "none"]
    )
    assert (cli.clip_algorithm, cli.agc_clip_factor, cli.agc_exclude) == ("agc", 0.02, ["^classifier\\.", "pooler"])
    assert (cli.skip_nonfinite_grads, cli.max_nonfinite_skips, cli.log_grad_norms) == (True, 3, True)
    assert (cli.grad_snapshot_tensors, cli.autoclip_percentile) == (["layer\\.2\\."], 25.0)
    path = tmp_path / "args.json"
    path.write_text(cli.to_json_string())
    (from_json,) = parser.parse_json_file(str(path))
    for name in ("clip_algorithm", "agc_exclude", "grad_snapshot_tensors", "max_nonfinite_skips", "agc_eps"):
        assert getattr(from_json, name) == getattr(cli, name), name
    choices = {a.dest: a.choices for a in parser._actions}
    assert list(choices["clip_algorithm"]) == ["norm", "agc", "autoclip", "zclip"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "clip_algorithm",
            "adaptive",
            "`clip_algorithm` must be one of 'norm', 'agc', 'autoclip', 'zclip', got 'adaptive'",
        ),
        ("agc_clip_factor", -1.0, "`agc_clip_factor` must be a positive finite number, got -1.0"),
        ("agc_eps", math.inf, "`agc_eps` must be a positive finite number, got inf"),
        ("agc_exclude", "classifier", "`agc_exclude` must be a list of patterns, got the string 'classifier'"),
        ("autoclip_percentile", 150.0, r"`autoclip_percentile` must be a number in \(0, 100\], got 150.0"),
        ("skip_nonfinite_grads", "yes", "`skip_nonfinite_grads` must be True or False, got 'yes'"),
        ("max_nonfinite_skips", 0, "`max_nonfinite_skips` must be a positive integer, got 0"),
        ("log_grad_norms", None, "`log_grad_norms` must be True or False, got None"),
        ("grad_snapshot_tensors", ["("], "`grad_snapshot_tensors` pattern '\\(' is not a valid regular expression"),
    ],
)
def test_bad_values_name_field_value_and_allowed(tmp_path, field, value, message):
    from hf_gradtools import GradTrainingArguments

    with pytest.raises(ValueError, match=message):
        GradTrainingArguments(str(tmp_path), report_to="none", **{field: value})
