"""GradTrainer against a hand-written PyTorch loop, and what it must never do (clip during evaluation)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T

from hf_gradtools import GradTrainer, get_frozen_parameters
from tests.conftest import classification_data, tiny_classifier


def hand_written_loop(model, data, *, batch, accumulation, steps, lr, weight_decay, max_norm, norm_type):
    """The loop users write by hand: loss / N, backward, clip, step, zero."""
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[0].requires_grad_(False)
    no_decay = ("bias", "LayerNorm")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    model.train()
    for step in range(steps):
        for micro in range(accumulation):
            start = (step * accumulation + micro) * batch
            inputs = {k: torch.tensor(data[start : start + batch][k]) for k in data.column_names}
            (model(**inputs).loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], max_norm, norm_type)
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_matches_hand_written_loop(args_factory, norm_type):
    data = classification_data(24)
    settings = dict(batch=4, accumulation=2, steps=3, lr=1e-2, weight_decay=0.1, max_norm=0.05, norm_type=norm_type)
    expected = hand_written_loop(tiny_classifier(), data, **settings)
    model = tiny_classifier()
    args = args_factory(
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=0.05,
        clip_norm_type=norm_type,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        freeze_embeddings=True,
        freeze_first_n_layers=1,
    )
    trainer = GradTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 3 and all(n > 0.05 for n in norms), "clipping must be active in this test"
    assert get_frozen_parameters(model) == get_frozen_parameters(expected)
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_logged_grad_norm_is_pre_clip_in_norm_type(args_factory):
    data = classification_data(8)
    model = tiny_classifier()
    reference = tiny_classifier()
    batch = {k: torch.tensor(data[0:8][k]) for k in data.column_names}
    reference(**batch).loss.backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()], 1.0).item()
    args = args_factory(per_device_train_batch_size=8, max_steps=1, max_grad_norm=1e-3, clip_norm_type=1.0)
    trainer = GradTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert logged == [pytest.approx(expected, rel=1e-5)]


def test_value_clipping_without_norm_clipping(args_factory):
    """`max_grad_norm=0`, `clip_grad_value=v`: the update uses gradients clamped to [-v, v]."""
    data = classification_data(8)
    captured = []

    class Capture(T.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))

    args = args_factory(per_device_train_batch_size=8, max_steps=1, max_grad_norm=0.0, clip_grad_value=1e-3)
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=data, callbacks=[Capture()])
    trainer.train()
    assert captured == [pytest.approx(1e-3)]


def test_evaluation_never_clips_and_leaves_no_grad(args_factory, monkeypatch):
    data = classification_data(8)
    args = args_factory(
        per_device_train_batch_size=4,
        max_steps=2,
        max_grad_norm=0.5,
        clip_norm_type=1.0,  # our clipping path (L2 alone runs the Trainer's own)
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=4,
    )
    trainer = GradTrainer(model=tiny_classifier(), args=args, train_dataset=data, eval_dataset=data)
    calls = []
    original = trainer._clip_and_record
    monkeypatch.setattr(trainer, "_clip_and_record", lambda: calls.append(1) or original())
    trainer.train()
    assert len(calls) == 2  # once per optimizer step, none for the two evaluations
    trainer.evaluate()
    trainer.predict(data)
    assert len(calls) == 2
    assert all(p.grad is None for p in trainer.model.parameters())


def test_plain_training_arguments_are_kept_as_they_are(tmp_path):
    plain = T.TrainingArguments(output_dir=str(tmp_path / "o"), learning_rate=3e-4, report_to="none", use_cpu=True)
    trainer = GradTrainer(model=tiny_classifier(), args=plain)
    assert trainer.args is plain and not hasattr(plain, "clip_norm_type")
    assert trainer.args.learning_rate == 3e-4


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    """Stop after 2 of 4 steps mid-epoch, resume from the checkpoint: same weights, same snapshots."""
    from hf_gradtools import load_grad_snapshots
    from tests.conftest import grad_args

    data = classification_data(24)
    common = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        grad_snapshot_steps=1,
        max_grad_norm=0.05,
        freeze_embeddings=True,
        freeze_first_n_layers=1,
        lr_scheduler_type="linear",
    )
    full = GradTrainer(model=tiny_classifier(), args=grad_args(tmp_path / "full", **common), train_dataset=data)
    full.train()

    first = GradTrainer(
        model=tiny_classifier(),
        train_dataset=data,
        args=grad_args(tmp_path / "parts", save_strategy="steps", save_steps=2, **common),
    )
    first.train()  # trains to step 4 too; the checkpoint at step 2 is what we resume from
    resumed_args = grad_args(tmp_path / "resumed", **common)
    resumed = GradTrainer(model=tiny_classifier(seed=5), args=resumed_args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "parts" / "out" / "checkpoint-2"))

    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    whole = {s["step"]: s for s in load_grad_snapshots(tmp_path / "full" / "out")}
    after = load_grad_snapshots(tmp_path / "resumed" / "out")
    assert [s["step"] for s in after] == [3, 4]
    for snapshot in after:
        assert snapshot["total_norm_pre_clip"] == pytest.approx(
            whole[snapshot["step"]]["total_norm_pre_clip"], rel=1e-5
        )
