"""The noise scale wired into GradTrainer: the logged `grad_noise_scale` against per-example gradients computed
by hand.

A linear regression with Gaussian inputs, `learning_rate=0` (the gradient distribution never moves) and sequential
sampling: each micro-batch's per-example gradients are analytic, `(prediction - label) * (x, 1)`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_gradtools import GradTrainer
from hf_gradtools.monitoring.noise_scale import exact_noise_scale
from tests.conftest import grad_args

pytestmark = pytest.mark.usefixtures("single_thread")

DIM = 6


class LinearRegression(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(DIM, 1)

    def forward(self, x, labels=None):
        return {"loss": 0.5 * (self.linear(x).squeeze(-1) - labels).square().mean()}


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, DIM, generator=g)
        truth = torch.linspace(-1, 1, DIM)
        self.y = self.x @ truth + 0.5 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def per_example_grads(model: LinearRegression, data: Rows) -> torch.Tensor:
    """`[rows, DIM + 1]`: the gradient of each row's loss with respect to (weight, bias), in float64."""
    w, b = model.linear.weight.detach().double()[0], model.linear.bias.detach().double()
    x = data.x.double()
    residual = x @ w + b - data.y.double()
    return torch.cat([residual[:, None] * x, residual[:, None]], dim=1)


def train(tmp_path, rows: int, batch: int, accumulation: int, steps: int, beta: float, logging_steps: int = 1):
    data = Rows(rows)
    args = grad_args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=0.0,
        max_grad_norm=1.0,  # clipping comes after the measurement
        log_grad_noise_scale=True,
        grad_noise_scale_beta=beta,
        logging_steps=logging_steps,
        disable_tqdm=True,
    )
    trainer = GradTrainer(model=LinearRegression(), args=args, train_dataset=data)
    trainer.train()
    logged = {h["step"]: h["grad_noise_scale"] for h in trainer.state.log_history if "grad_noise_scale" in h}
    return trainer, data, logged


def test_every_logged_value_equals_the_estimator_by_hand(tmp_path):
    batch, accumulation, steps, beta = 4, 4, 12, 0.9
    trainer, data, logged = train(tmp_path, 64, batch, accumulation, steps, beta)
    grads = per_example_grads(trainer.model, data)
    window = batch * accumulation
    averages, expected = torch.zeros(2, dtype=torch.float64), {}
    for step in range(1, steps + 1):
        start = (step - 1) * window % len(data)  # sequential sampling, 4 windows per epoch
        small = grads[start : start + batch].mean(0).square().sum()
        big = grads[start : start + window].mean(0).square().sum()
        g2 = (window * big - batch * small) / (window - batch)
        trace = (small - big) / (1 / batch - 1 / window)
        averages = beta * averages + (1 - beta) * torch.stack([g2, trace])
        corrected = averages / (1 - beta**step)
        expected[step] = float(corrected[1] / corrected[0])
    assert logged == pytest.approx(expected, rel=1e-4)
    assert trainer.state.log_history[-1]["train_loss"] > 0  # the Trainer's final metrics carry no noise scale
    assert "grad_noise_scale" not in trainer.state.log_history[-1]


def test_the_moving_average_lands_near_the_exact_noise_scale(tmp_path):
    batch, accumulation, steps = 8, 8, 500
    trainer, data, logged = train(tmp_path, batch * accumulation * steps, batch, accumulation, steps, 0.99, 100)
    exact = exact_noise_scale(per_example_grads(trainer.model, data)).b_simple
    assert sorted(logged) == [100, 200, 300, 400, 500]
    assert exact / 1.5 < logged[500] < exact * 1.5, (logged, exact)


def test_a_default_run_logs_no_noise_scale(tmp_path):
    data = Rows(32)
    args = grad_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2)
    trainer = GradTrainer(model=LinearRegression(), args=args, train_dataset=data)
    trainer.train()
    assert not any("grad_noise_scale" in h or "unfrozen_blocks" in h for h in trainer.state.log_history)
    assert not (tmp_path / "out" / "frozen_parameters.json").exists()


def test_without_a_known_loss_normalisation_it_is_skipped_with_one_warning(tmp_path, caplog):
    args = grad_args(
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        log_grad_noise_scale=True,
        loss_normalization="trainer",  # the Trainer's own scaling: the gradient's units are unknown
    )
    trainer = GradTrainer(model=LinearRegression(), args=args, train_dataset=Rows(32))
    with caplog.at_level("WARNING", logger="hf_gradtools"):
        trainer.train()
    assert not any("grad_noise_scale" in h for h in trainer.state.log_history)
    assert [r.getMessage() for r in caplog.records].count(
        "hf_gradtools: `grad_noise_scale` skips every window whose loss is not a mean over known items; the loss "
        "normalisation here is not established. Declare it with `loss_normalization` (token, sample, ...)."
    ) == 1
