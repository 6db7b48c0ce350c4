"""fp16 and bf16 mixed precision on a GPU: clipping, the grad scaler and the non-finite guard.

Each test runs the same tiny model and data through `GradTrainer` and through the reference it must equal: the
plain `Trainer` when every new field is at its default, else the loop people write by hand (`autocast`,
`GradScaler.scale(loss).backward()`, `unscale_`, clip, `scaler.step`, `scaler.update`). SGD keeps the comparison
linear in the gradients, so a wrong scale, a clip of scaled gradients or a missed skip shows in the weights.

Skipped without CUDA (fp16 autocast with a grad scaler needs a GPU); `HF_GRADTOOLS_REQUIRE_CUDA=1` makes a missing
GPU a failure instead, for the GPU check.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import transformers as T

from hf_gradtools import GradTrainer
from hf_gradtools.clipping.agc import agc_clip_, default_agc_exclude, transposed_weights
from tests.conftest import classification_data, tiny_classifier

if os.environ.get("HF_GRADTOOLS_REQUIRE_CUDA") == "1":
    assert torch.cuda.is_available(), "HF_GRADTOOLS_REQUIRE_CUDA=1 but torch sees no CUDA device"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BATCH, ACCUMULATION, STEPS, LR = 4, 2, 6, 0.5
OVERFLOW_SCALE = 2.0**40  # fp16 gradients overflow until the scaler has backed off to about 2**15


def amp_args(args_factory, precision: str, **overrides):
    settings = dict(
        use_cpu=False,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=STEPS,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="linear",
        warmup_steps=0,
    )
    return args_factory(**{**settings, precision: True, **overrides})


def set_initial_scale(trainer, scale):
    """Start fp16's grad scaler at `scale` (it creates its scale tensor lazily, at the first backward)."""
    if scale is not None:
        trainer.accelerator.scaler._init_scale = scale


def train(cls, args, data, scale=None):
    trainer = cls(model=tiny_classifier(), args=args, train_dataset=data)
    set_initial_scale(trainer, scale)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logs


def hand_loop(data, *, dtype, clip, scale=None):
    """autocast + (for fp16) GradScaler, loss / N, clip the unscaled gradients, step, linear decay; SGD.

    The scheduler moves only on steps the scaler did not skip, as accelerate does. Returns the model, the norm
    `clip` returned at each optimizer step and the number of skipped steps.
    """
    model = tiny_classifier().cuda().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, (STEPS - step) / STEPS))
    scaler = torch.amp.GradScaler("cuda", init_scale=scale or 2.0**16) if dtype is torch.float16 else None
    norms, skipped = [], 0
    for step in range(STEPS):
        for micro in range(ACCUMULATION):
            start = (step * ACCUMULATION + micro) * BATCH
            inputs = {k: torch.tensor(data[start : start + BATCH][k]).cuda() for k in data.column_names}
            with torch.autocast("cuda", dtype=dtype):
                loss = model(**inputs).loss
            loss = loss.float() / ACCUMULATION
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        norms.append(float(clip(model)))
        if scaler:
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= before
        else:
            optimizer.step()
            stepped = True
        if stepped:
            schedule.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
    return model, norms, skipped


def assert_same_weights(model, expected, atol=1e-6):
    for (name, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_defaults_equal_trainer_under_mixed_precision(args_factory, precision):
    """Every new field at its default: the weights, the logged norms and losses and the scale are the Trainer's.

    Without accumulation: with it, the Trainer's gradient of this head is N times too large (its loss takes no item
    count, so the Trainer leaves it undivided); `test_fp16_accumulation_equals_hand_loop` covers that case.
    """
    data = classification_data(BATCH * ACCUMULATION * STEPS)
    args = amp_args(args_factory, precision, max_grad_norm=0.05, gradient_accumulation_steps=1)
    ours, our_logs = train(GradTrainer, args, data)
    theirs, their_logs = train(T.Trainer, args, data)
    assert_same_weights(ours.model, theirs.model, atol=0)
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [h[key] for h in our_logs] == [h[key] for h in their_logs], key
    if precision == "fp16":
        assert ours.accelerator.scaler.get_scale() == theirs.accelerator.scaler.get_scale()


def test_fp16_overflow_steps_skip_as_the_trainer_does(args_factory):
    """Forced overflows at the start: the same steps are skipped, the schedule waits alike, the weights agree."""
    data = classification_data(BATCH * ACCUMULATION * STEPS)
    args = amp_args(args_factory, "fp16", max_grad_norm=0.05, gradient_accumulation_steps=1)
    ours, our_logs = train(GradTrainer, args, data, scale=2.0**18)
    theirs, their_logs = train(T.Trainer, args, data, scale=2.0**18)
    assert ours.accelerator.scaler.get_scale() < 2.0**18, "no overflow happened: the test checks nothing"
    assert_same_weights(ours.model, theirs.model, atol=0)
    assert [h["learning_rate"] for h in our_logs] == [h["learning_rate"] for h in their_logs]


def test_fp16_accumulation_equals_hand_loop(args_factory):
    """Default L2 clipping with 2 micro-batches per step: exactly the hand-written loss / N under fp16 and its
    scaler, with the clip bound loose enough that a wrong gradient scale would show."""
    data = classification_data(BATCH * ACCUMULATION * STEPS)

    def clip(model):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0, 2.0)

    expected, norms, skipped = hand_loop(data, dtype=torch.float16, clip=clip)
    trainer, logs = train(GradTrainer, amp_args(args_factory, "fp16", max_grad_norm=10.0), data)
    assert skipped == 0 and max(norms) < 10.0
    assert [h["grad_norm"] for h in logs] == pytest.approx(norms, rel=1e-5)
    assert_same_weights(trainer.model, expected)


@pytest.mark.parametrize("norm_type", [1.0, math.inf])
def test_fp16_norm_clipping_clips_unscaled_gradients(args_factory, norm_type):
    """A norm type the Trainer lacks: clipped after unscaling, logged as the pre-clip norm of the true gradient."""
    data = classification_data(BATCH * ACCUMULATION * STEPS)
    max_norm = 0.05

    def clip(model):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)

    expected, norms, skipped = hand_loop(data, dtype=torch.float16, clip=clip)
    trainer, logs = train(GradTrainer, amp_args(args_factory, "fp16", max_grad_norm=max_norm,
                                                clip_norm_type=norm_type), data)  # fmt: skip
    assert skipped == 0 and min(norms) > max_norm, "clipping must be active, with no overflow, in this test"
    assert [h["grad_norm"] for h in logs] == pytest.approx(norms, rel=1e-5)
    assert_same_weights(trainer.model, expected)


def test_bf16_value_then_norm_clipping_equals_hand_loop(args_factory):
    data = classification_data(BATCH * ACCUMULATION * STEPS)

    def clip(model):
        torch.nn.utils.clip_grad_value_(model.parameters(), 2e-2)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, 2.0)

    expected, norms, _ = hand_loop(data, dtype=torch.bfloat16, clip=clip)
    args = amp_args(args_factory, "bf16", max_grad_norm=0.05, clip_grad_value=2e-2)
    trainer, logs = train(GradTrainer, args, data)
    assert min(norms) > 0.05, "norm clipping must be active after value clipping in this test"
    assert_same_weights(trainer.model, expected)


def test_fp16_agc_sees_unscaled_gradients(args_factory):
    """AGC compares gradients with weights: on scaled gradients it would clip everything to the bound."""
    data = classification_data(BATCH * ACCUMULATION * STEPS)
    model = tiny_classifier()
    exclude, transposed = default_agc_exclude(model), transposed_weights(model)

    def clip(model):
        result = agc_clip_(model.named_parameters(), 0.02, 1e-3, exclude, norm_type=2.0, transposed=transposed)
        return result.total_norm_post_clip

    expected, _, skipped = hand_loop(data, dtype=torch.float16, clip=clip)
    args = amp_args(args_factory, "fp16", clip_algorithm="agc", agc_clip_factor=0.02)
    trainer, _ = train(GradTrainer, args, data)
    assert skipped == 0
    assert_same_weights(trainer.model, expected)


def test_fp16_guard_skips_overflow_steps_like_the_scaler(args_factory):
    """With the guard on, an fp16 overflow is skipped once (by the scaler, which backs off once), counted in
    `nonfinite_skips`, and the schedule waits as in the hand-written loop."""
    data = classification_data(BATCH * ACCUMULATION * STEPS)

    def clip(model):
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05, 1.0)

    expected, norms, skipped = hand_loop(data, dtype=torch.float16, clip=clip, scale=2.0**18)
    args = amp_args(args_factory, "fp16", max_grad_norm=0.05, clip_norm_type=1.0, skip_nonfinite_grads=True)
    trainer, logs = train(GradTrainer, args, data, scale=2.0**18)
    assert 0 < skipped < STEPS, f"{skipped} overflow steps: the test needs some, not all"
    assert trainer.accelerator.scaler.get_scale() == pytest.approx(2.0**18 * 0.5**skipped)
    assert logs[-1]["nonfinite_skips"] == skipped
    assert_same_weights(trainer.model, expected)
