"""`max_grad_norm` of 0, less, or NaN turns norm clipping off, as in the Trainer (which clips only when
`max_grad_norm > 0`); before, GradTrainer's own clipping path scaled by a negative or NaN bound."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T

from hf_gradtools import GradTrainer, GradTrainingArguments, clip_gradients
from tests.conftest import classification_data, tiny_classifier


def losses(trainer_class, args_class, max_grad_norm, tmp_path, **fields):
    torch.manual_seed(0)
    args = args_class(
        str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1.0, optim="sgd",
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=max_grad_norm,
        logging_steps=1, train_sampling_strategy="sequential", **fields,
    )  # fmt: skip
    trainer = trainer_class(model=tiny_classifier(), args=args, train_dataset=classification_data(16))
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("max_grad_norm", [-1.0, math.nan])
def test_a_negative_or_nan_bound_does_not_clip_as_in_the_trainer(max_grad_norm, tmp_path, single_thread):
    unclipped = losses(T.Trainer, T.TrainingArguments, 0.0, tmp_path / "t0")
    assert losses(T.Trainer, T.TrainingArguments, max_grad_norm, tmp_path / "t") == unclipped
    assert losses(GradTrainer, GradTrainingArguments, max_grad_norm, tmp_path / "g") == unclipped
    # The package's own clipping path (another norm type) too: its logged norm is in that norm, nothing is scaled.
    own = losses(GradTrainer, GradTrainingArguments, max_grad_norm, tmp_path / "o", clip_norm_type=1.0)
    assert own == losses(GradTrainer, GradTrainingArguments, 0.0, tmp_path / "o0", clip_norm_type=1.0) == unclipped


@pytest.mark.parametrize("value", ["1.0", [1.0], True])
def test_a_bound_that_is_not_a_number_is_refused_when_the_arguments_are_built(value, tmp_path):
    with pytest.raises(ValueError, match=r"`max_grad_norm` must be a number"):
        GradTrainingArguments(str(tmp_path), max_grad_norm=value, report_to="none")
    GradTrainingArguments(str(tmp_path), max_grad_norm=None, report_to="none")  # as by the Trainer: train() names it


def test_clip_gradients_takes_a_bound_that_is_off_and_refuses_a_bad_clip_value():
    param = torch.nn.Parameter(torch.ones(2))
    for bound in (-1.0, math.nan, 0.0, None):
        param.grad = torch.full((2,), 3.0)
        result = clip_gradients([param], max_norm=bound)
        assert torch.equal(param.grad, torch.full((2,), 3.0)) and result.total_norm_post_clip.item() == pytest.approx(
            math.sqrt(18)
        )
    for value in (-1.0, 0.0, math.nan, math.inf, "1"):
        with pytest.raises(ValueError, match="`clip_value` must be a positive finite number"):
            clip_gradients([param], clip_value=value)
