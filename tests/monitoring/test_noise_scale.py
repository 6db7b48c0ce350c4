"""The gradient noise scale estimator, on linear regression where per-item gradients are analytic.

Model `f(x) = theta . x`, targets `y = w . x + sigma * eps`, `x ~ N(0, I_d)`, loss the mean squared error. With
`delta = theta - w` one item's gradient is `g = 2 (theta . x - y) x`, its mean `G = 2 delta`, and
`tr(S) = 4 (|delta|^2 (d + 1) + sigma^2 d)`, so `B_simple = d + 1 + sigma^2 d / |delta|^2` exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hf_gradtools.accumulation import micro_batch_loss_weights
from hf_gradtools.monitoring.noise_scale import (
    GradientNoiseScale,
    exact_noise_scale,
    micro_batch_sq_norm,
    squared_grad_norm,
)

pytestmark = pytest.mark.usefixtures("single_thread")

D, SIGMA = 8, 1.0


def regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g, dtype=torch.float64)
    delta = torch.randn(D, generator=g, dtype=torch.float64)
    delta = delta / delta.norm()  # |delta| = 1: B_simple = d + 1 + sigma^2 d = 17
    return w, w + delta


def sample(w: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    return x, x @ w + SIGMA * torch.randn(n, generator=g, dtype=torch.float64)


def per_item_grads(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 2 * (x @ theta - y)[:, None] * x


def exact_b_simple() -> float:
    return D + 1 + SIGMA**2 * D


def hand_estimates(grads: torch.Tensor, sizes: list[int]) -> tuple[float, float]:
    """|G|^2 and tr(S) estimated from one window's per-item gradients, as the paper writes them."""
    b_small, b_big = sizes[0], sum(sizes)
    small = grads[:b_small].mean(0).square().sum().item()
    big = grads.mean(0).square().sum().item()
    g2 = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1 / b_small - 1 / b_big)
    return g2, trace


@pytest.mark.parametrize("sizes", [[8] * 8, [5, 8, 3, 8]], ids=["8x8", "unequal"])
def test_update_equals_hand_computation_through_autograd(sizes):
    """The trainer's path: weighted micro-batch losses, `.grad` after the first backward, the window's `.grad`."""
    w, theta = regression()
    model = torch.nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(theta.float())
    beta = 0.9
    noise = GradientNoiseScale(beta=beta)
    g = torch.Generator().manual_seed(1)
    ema_g2 = ema_trace = 0.0
    for t in range(1, 21):
        x, y = sample(w, sum(sizes), g)
        batches = [
            {"x": xb.float(), "labels": yb.float()} for xb, yb in zip(x.split(sizes), y.split(sizes), strict=True)
        ]
        weights = micro_batch_loss_weights(batches)
        model.zero_grad(set_to_none=True)
        for k, (batch, weight) in enumerate(zip(batches, weights, strict=True)):
            loss = F.mse_loss(model(batch["x"]).squeeze(-1), batch["labels"]) * weight
            loss.backward()
            if k == 0:
                small = micro_batch_sq_norm(model.parameters(), weight)
        big = squared_grad_norm([model.weight.grad])
        # Counts as tensors, as token-level losses give them.
        noise.update(small, torch.tensor(sizes[0]), big, torch.tensor(sum(sizes)))

        g2, trace = hand_estimates(per_item_grads(theta, x, y), sizes)
        ema_g2 = beta * ema_g2 + (1 - beta) * g2
        ema_trace = beta * ema_trace + (1 - beta) * trace
        correction = 1 - beta**t
        assert noise.grad_sq_norm.item() == pytest.approx(ema_g2 / correction, rel=1e-4)
        assert noise.trace_cov.item() == pytest.approx(ema_trace / correction, rel=1e-4)
        assert noise.value.item() == pytest.approx(ema_trace / ema_g2, rel=1e-4)
    assert int(noise.num_updates) == 20


def test_exact_noise_scale_matches_the_analytic_value():
    w, theta = regression()
    x, y = sample(w, 200_000, torch.Generator().manual_seed(2))
    exact = exact_noise_scale(per_item_grads(theta, x, y))
    assert exact.grad_sq_norm == pytest.approx(4.0, rel=0.03)
    assert exact.b_simple == pytest.approx(exact_b_simple(), rel=0.03)


def test_moving_average_lands_near_the_exact_noise_scale():
    """beta 0.99 over 500 windows of batch 8 x accumulation 8, fresh samples each window, theta fixed."""
    w, theta = regression()
    g = torch.Generator().manual_seed(3)
    noise = GradientNoiseScale(beta=0.99)
    x, y = sample(w, 500 * 64, g)
    grads = per_item_grads(theta, x, y).view(500, 64, D)
    small = grads[:, :8].mean(1).square().sum(1)
    big = grads.mean(1).square().sum(1)
    for s, b in zip(small, big, strict=True):
        noise.update(s, 8, b, 64)
    exact = exact_b_simple()
    estimate = noise.value.item()
    assert exact / 1.5 < estimate < exact * 1.5, (estimate, exact)


def test_state_dict_round_trip_continues_exactly():
    g = torch.Generator().manual_seed(4)
    norms = torch.rand(20, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0], dtype=torch.float64)
    first, resumed = GradientNoiseScale(0.95), GradientNoiseScale(0.95)
    for s, b in norms[:10]:
        first.update(s, 4, b, 16)
    state = json.loads(json.dumps(first.state_dict()))  # plain numbers only
    assert state["steps"] == 10
    resumed.load_state_dict(state)
    for s, b in norms[10:]:
        first.update(s, 4, b, 16)
        resumed.update(s, 4, b, 16)
    assert resumed.value.item() == first.value.item()
    assert resumed.state_dict() == first.state_dict()


def test_skipped_windows_leave_the_averages_unchanged():
    noise = GradientNoiseScale(0.9)
    assert math.isnan(noise.value.item())
    noise.update(torch.tensor(2.0), 4, torch.tensor(1.0), 16)
    before = noise.state_dict()
    noise.update(torch.tensor(float("inf")), 4, torch.tensor(1.0), 16)  # fp16 overflow
    noise.update(torch.tensor(2.0), 4, torch.tensor(float("nan")), 16)
    noise.update(torch.tensor(2.0), torch.tensor(4), torch.tensor(1.0), torch.tensor(4))  # a one-micro-batch window
    noise.update(torch.tensor(2.0), torch.tensor(0), torch.tensor(1.0), torch.tensor(8))  # no item in it
    assert noise.state_dict() == before


def test_beta_zero_keeps_the_latest_window():
    noise = GradientNoiseScale(0.0)
    noise.update(2.0, 4, 1.0, 16)
    noise.update(3.0, 4, 1.0, 16)
    g2 = (16 * 1.0 - 4 * 3.0) / 12
    trace = (3.0 - 1.0) / (1 / 4 - 1 / 16)
    assert noise.value.item() == pytest.approx(trace / g2)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, float("nan"), True, "0.9"])
def test_bad_beta_is_refused(beta):
    with pytest.raises(ValueError, match=r"`grad_noise_scale_beta` must be a number in \[0, 1\), got"):
        GradientNoiseScale(beta)


@pytest.mark.parametrize(
    ("b_small", "b_big", "message"),
    [
        (0, 8, "`b_small` must be a positive number of items, got 0"),
        (4, -1, "`b_big` must be a positive number of items, got -1"),
        (8, 8, "`b_big` must be larger than `b_small`"),
        (8, 4, "got b_small=8, b_big=4"),
    ],
)
def test_bad_counts_are_refused(b_small, b_big, message):
    with pytest.raises(ValueError, match=message):
        GradientNoiseScale().update(1.0, b_small, 1.0, b_big)


def test_load_with_another_beta_is_refused():
    state = GradientNoiseScale(0.9).state_dict()
    with pytest.raises(ValueError, match="`grad_noise_scale_beta`=0.95 but the checkpoint's averages"):
        GradientNoiseScale(0.95).load_state_dict(state)


def test_squared_grad_norm_over_dtypes():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([2.0])]
    assert squared_grad_norm(grads).item() == pytest.approx(25 + 5 + 4)
    assert squared_grad_norm([]).item() == 0.0


def test_micro_batch_sq_norm_divides_by_the_loss_weight():
    layer = torch.nn.Linear(2, 1)
    layer.weight.grad = torch.tensor([[0.3, 0.4]])
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)  # no .grad: skipped
    assert micro_batch_sq_norm([layer.weight, layer.bias, frozen], 0.25).item() == pytest.approx(0.25 / 0.0625)
    assert micro_batch_sq_norm([layer.weight], torch.tensor(0.5)).item() == pytest.approx(1.0)


def test_exact_noise_scale_refuses_a_vector():
    with pytest.raises(ValueError, match="`per_item_grads` must be a 2-D tensor"):
        exact_noise_scale(torch.ones(3))


def test_update_never_reads_a_tensor_back_to_the_host():
    """On the meta device any read-back (`.item()`, `bool()`, `float()`) raises: `update` and the helpers do none."""

    def meta(value):
        return torch.tensor(value, device="meta")

    noise = GradientNoiseScale()
    noise.update(meta(2.0), meta(4), meta(1.0), meta(16))
    noise.update(meta(2.0), 4, meta(1.0), 16)
    assert noise.value.device.type == "meta"
    param = torch.nn.Parameter(torch.ones(3, device="meta"))
    param.grad = torch.ones(3, device="meta")
    assert micro_batch_sq_norm([param], meta(0.5)).device.type == "meta"
    with pytest.raises(RuntimeError, match="meta"):
        noise.value.item()
