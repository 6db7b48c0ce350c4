"""The gradient noise scale of McCandlish et al. 2018, "An Empirical Model of Large-Batch Training".

The simple noise scale `B_simple = tr(S) / |G|^2` (S: the covariance of one item's gradient, G: the true gradient)
estimates the critical batch size, in items: below it a larger batch trains nearly proportionally faster per step,
far above it the extra items are mostly wasted. With gradient accumulation every optimizer step holds two gradients
of different batch sizes, the first micro-batch's (`B_small` items) and the whole window's (`B_big` items). Since
`E|G_B|^2 = |G|^2 + tr(S) / B`, two batch sizes give the unbiased estimates (appendix A of the paper)

    |G|^2 ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(S) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Each is noisy, so `GradientNoiseScale` smooths both with a bias-corrected exponential moving average (as Adam does
its moments) and reports the ratio of the averages. Both squared norms must be in loss units: the gradient of the
*mean* loss over the batch's items.

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> grads = torch.randn(4096, 3) + torch.tensor([1.0, 0.0, 0.0])  # per-item gradients: |G|^2 = 1, tr(S) = 3
    >>> noise = GradientNoiseScale(beta=0.9)
    >>> for window in grads.split(64):
    ...     small, big = window[:8].mean(0), window.mean(0)
    ...     noise.update(small.square().sum(), 8, big.square().sum(), 64)
    >>> round(exact_noise_scale(grads).b_simple, 1), 1.5 < float(noise.value) < 6
    (3.1, True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import NamedTuple

import torch

from ..accumulation import count_items
from ..clipping import grad_norms
from ..components import TrainerComponent
from ..state_fields import FLOAT64_EXACT_INT, FieldReader

logger = logging.getLogger(__name__)

Number = float | int | torch.Tensor


def squared_grad_norm(grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """The squared L2 norm of all `grads` taken as one vector, as a float32 0-d tensor on the first one's device.

    One fused `torch._foreach_norm` call per device and dtype; nothing is read back to the host.
    """
    grads = list(grads)
    if not grads:
        return torch.zeros(())
    return grad_norms(grads, 2.0).square().sum()


def micro_batch_sq_norm(parameters: Iterable[torch.Tensor], loss_weight: Number = 1.0) -> torch.Tensor:
    """`|G_small|^2` in loss units, from the `.grad` of `parameters` right after the first micro-batch's backward.

    At that moment (before the next micro-batch's backward adds to it) `.grad` holds exactly that micro-batch's
    gradient times the factor its mean loss was multiplied by before `backward()`: the accumulation weight
    `items_in_micro_batch / items_in_window` (times the world size under DDP, see `accumulation.py`), times the
    loss scale when fp16 uses a grad scaler. Pass that product as `loss_weight`; the result is `|grad|^2 /
    loss_weight^2`, the squared norm of the gradient of the micro-batch's mean loss. Parameters without a gradient
    (frozen ones) are skipped. A zero weight (a micro-batch without items) gives a non-finite value, which
    `GradientNoiseScale.update` ignores.
    """
    sq_norm = squared_grad_norm(p.grad for p in parameters if p.grad is not None)
    if isinstance(loss_weight, torch.Tensor):
        loss_weight = loss_weight.to(sq_norm.device, torch.float32)
    return sq_norm / (loss_weight * loss_weight)


class NoiseScale(NamedTuple):
    """`b_simple = trace_cov / grad_sq_norm`, from per-item gradients."""

    b_simple: float
    grad_sq_norm: float
    trace_cov: float


def exact_noise_scale(per_item_grads: torch.Tensor) -> NoiseScale:
    """The exact noise scale of a dataset from its per-item gradients, one row each (shape `[items, parameters]`).

    `|G|^2` is the squared norm of the mean row, `tr(S)` the mean squared distance of a row from it (the items are
    the whole population, so no Bessel correction). Computed in float64.
    """
    if per_item_grads.dim() != 2 or per_item_grads.shape[0] < 1:
        raise ValueError(
            f"`per_item_grads` must be a 2-D tensor with one row per item, got shape {tuple(per_item_grads.shape)}."
        )
    grads = per_item_grads.double()
    mean = grads.mean(0)
    grad_sq_norm = float(mean.square().sum())
    trace_cov = float((grads - mean).square().sum(1).mean())
    b_simple = trace_cov / grad_sq_norm if grad_sq_norm > 0 else math.inf
    return NoiseScale(b_simple=b_simple, grad_sq_norm=grad_sq_norm, trace_cov=trace_cov)


def _check_count(value: Number, field: str) -> None:
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{field}` must be a positive number of items, got {value!r}.")


class GradientNoiseScale:
    """Running estimate of the gradient noise scale `B_simple = tr(S) / |G|^2`, in items.

    Call `update` once per optimizer step with the squared norms of the first micro-batch's gradient and of the
    whole window's gradient (both in loss units, before clipping) and their item counts. Read `value` (or
    `grad_sq_norm`, `trace_cov`) when logging: they are 0-d tensors on the device of the inputs, so `update`
    never waits for the device when given tensors; `float(noise.value)` is the one host sync.

    A window is skipped (the averages and the step count stay as they were) when a norm is not finite (an fp16
    overflow) or when its counts are tensors with `B_big <= B_small` or `B_small <= 0`; Python numbers are checked
    instead, and bad ones raise a `ValueError`. Early on, or where the gradient is small against its noise, the
    unbiased `|G|^2` estimate can be negative and `value` with it: the averages are reported as they are.

    Args:
        beta: the decay of both moving averages, in [0, 1); 0 keeps only the latest window.
    """

    def __init__(self, beta: float = 0.95):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"`grad_noise_scale_beta` must be a number in [0, 1), got {beta!r}.")
        self.beta = float(beta)
        # [|G|^2 average, tr(S) average, number of windows averaged], float64 on the inputs' device.
        self._state: torch.Tensor = torch.zeros(3, dtype=torch.float64)

    def _on(self, device: torch.device) -> torch.Tensor:
        if self._state.device != device:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._state = self._state.to(device, dtype)
        return self._state

    def update(self, small_sq_norm: Number, b_small: Number, big_sq_norm: Number, b_big: Number) -> None:
        """Add one window: `|G_small|^2` of `b_small` items (its first micro-batch), `|G_big|^2` of `b_big` items."""
        _check_count(b_small, "b_small")
        _check_count(b_big, "b_big")
        if not any(isinstance(v, torch.Tensor) for v in (b_small, b_big)) and not b_big > b_small:
            raise ValueError(
                f"`b_big` must be larger than `b_small` (the window must hold more items than its first micro-batch), "
                f"got b_small={b_small!r}, b_big={b_big!r}."
            )
        device = next(
            (v.device for v in (small_sq_norm, big_sq_norm, b_small, b_big) if isinstance(v, torch.Tensor)),
            self._state.device,
        )
        state = self._on(device)

        def as_tensor(value: Number) -> torch.Tensor:
            if isinstance(value, torch.Tensor):
                return value.to(device, state.dtype)
            return torch.full((), value, device=device, dtype=state.dtype)

        small, big, n_small, n_big = (as_tensor(v) for v in (small_sq_norm, big_sq_norm, b_small, b_big))
        grad_sq_norm = (n_big * big - n_small * small) / (n_big - n_small)
        trace_cov = (small - big) / (1 / n_small - 1 / n_big)
        valid = torch.isfinite(small) & torch.isfinite(big) & (n_small > 0) & (n_big > n_small)
        new = torch.stack(
            [
                self.beta * state[0] + (1 - self.beta) * grad_sq_norm,
                self.beta * state[1] + (1 - self.beta) * trace_cov,
                state[2] + 1,
            ]
        )
        self._state = torch.where(valid, new, state)

    def _corrected(self, index: int) -> torch.Tensor:
        return self._state[index] / (1 - self.beta ** self._state[2])

    @property
    def num_updates(self) -> torch.Tensor:
        """How many windows the averages hold, as a 0-d tensor on the device."""
        return self._state[2]

    @property
    def grad_sq_norm(self) -> torch.Tensor:
        """The bias-corrected average of the `|G|^2` estimates (NaN before the first window)."""
        return self._corrected(0)

    @property
    def trace_cov(self) -> torch.Tensor:
        """The bias-corrected average of the `tr(S)` estimates (NaN before the first window)."""
        return self._corrected(1)

    @property
    def value(self) -> torch.Tensor:
        """`B_simple = tr(S) / |G|^2` of the averages, in items (NaN before the first window)."""
        return self.trace_cov / self.grad_sq_norm

    def state_dict(self) -> dict[str, float | int]:
        """The averages as plain Python numbers (one host sync), for a checkpoint."""
        grad_sq_norm, trace_cov, count = self._state.tolist()
        return {"beta": self.beta, "grad_sq_norm_ema": grad_sq_norm, "trace_cov_ema": trace_cov, "steps": int(count)}

    @staticmethod
    def check_state(state) -> dict:
        """`state` as `state_dict()` writes it, or `StateFieldError` naming the field: `beta` in [0, 1), finite
        averages (either may be negative, see the class), and a whole number of windows."""
        fields = FieldReader(
            state,
            "GradientNoiseScale state must be {'beta': float, 'grad_sq_norm_ema': float, 'trace_cov_ema': float, "
            "'steps': int}",
        )
        checked = {
            "beta": fields.number("beta", low=0.0, high=1.0, below_high=True),
            "grad_sq_norm_ema": fields.number("grad_sq_norm_ema"),
            "trace_cov_ema": fields.number("trace_cov_ema"),
            "steps": fields.integer("steps", high=FLOAT64_EXACT_INT),
        }
        fields.done()
        return checked

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore what `state_dict` returned (checked by `check_state`); a different `beta` is refused, since the
        averages would not match."""
        state = self.check_state(state)
        if state["beta"] != self.beta:
            raise ValueError(
                f"`grad_noise_scale_beta`={self.beta!r} but the checkpoint's averages were taken with "
                f"{state['beta']!r}. Resume with the same value."
            )
        values = [state["grad_sq_norm_ema"], state["trace_cov_ema"], float(state["steps"])]
        self._state = torch.tensor(values, dtype=self._state.dtype, device=self._state.device)


class WindowNoiseMeter:
    """Feeds a `GradientNoiseScale` from a training loop with exact gradient accumulation (`accumulation.py`).

    Per window of two or more micro-batches: `first_micro_batch` right after the first micro-batch's backward (its
    `.grad` is that micro-batch's alone, local to the process), then `window_end` after the last backward (under
    DDP, after the gradients were averaged over the processes) and before clipping. Nothing is read back to the host.

    Units: the accumulation weight of the first micro-batch is `w = b_small * world_size / b_big` (items of that
    micro-batch on this process, items of the window over all processes), and the window's gradient is the
    gradient of the mean loss over its `b_big` items. So `|G_small|^2 = |grad|^2 / (w * s)^2` and
    `|G_big|^2 = |grad|^2 / s^2`, with `s` the grad scaler's loss scale (1 without one), and `b_big` follows from
    `w`: `b_big = b_small * world_size / w`, with no collective.

    Args:
        beta: the decay of the moving averages (`grad_noise_scale_beta`).
    """

    def __init__(self, beta: float = 0.95):
        self.estimate = GradientNoiseScale(beta)
        self._small: tuple[torch.Tensor, Number, torch.Tensor] | None = None

    def first_micro_batch(
        self,
        parameters: Iterable[torch.Tensor],
        loss_weight: torch.Tensor,
        b_small: Number,
        world_size: int = 1,
        loss_scale: Number = 1.0,
    ) -> None:
        """Measure `|G_small|^2` (`b_small` items, weighted by `loss_weight`) from the `.grad` of `parameters`."""
        weight = loss_weight.to(torch.float64)
        small = micro_batch_sq_norm(parameters, weight * loss_scale)
        b_big = b_small * world_size / weight.to(small.device)
        self._small = (small, b_small, b_big)

    def window_end(self, parameters: Iterable[torch.Tensor], loss_scale: Number = 1.0) -> bool:
        """Measure `|G_big|^2` and add the window to the averages; `False` when no first micro-batch was measured."""
        if self._small is None:
            return False
        small, b_small, b_big = self._small
        self._small = None
        big = squared_grad_norm(p.grad for p in parameters if p.grad is not None)
        if isinstance(loss_scale, torch.Tensor):
            loss_scale = loss_scale.to(big.device, torch.float32)
        self.estimate.update(small, b_small, big / (loss_scale * loss_scale), b_big)
        return True

    def cancel(self) -> None:
        """Forget a measured first micro-batch (a window whose end is not measured)."""
        self._small = None


def loss_scale(accelerator) -> Number:
    """The grad scaler's loss scale (a device tensor: no host sync), or 1 without one."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, torch.Tensor) else scaler.get_scale()


class NoiseScaleLog(TrainerComponent):
    """`log_grad_noise_scale`: a `WindowNoiseMeter` fed by the trainer's windows; logs `grad_noise_scale`.

    It reads the trainer's accumulation divisors of the window (`_pending_loss_divisors`, `_window_rule`): a window
    whose loss is not a mean over known items is skipped, with one warning.
    """

    name = "noise_scale"
    check_state = staticmethod(GradientNoiseScale.check_state)

    def __init__(self, beta: float):
        self.meter = WindowNoiseMeter(beta)
        self._first: tuple[torch.Tensor, Number] | None = None
        self._skip_logged = False

    @classmethod
    def from_args(cls, settings, model) -> NoiseScaleLog | None:
        return cls(settings.grad_noise_scale_beta) if settings.log_grad_noise_scale else None

    def before_micro_batch(self, trainer, inputs: dict) -> None:
        """The loss weight and item count of a window's first micro-batch, when it can be measured."""
        self._first = None
        steps, weights, rule = trainer.current_gradient_accumulation_steps, trainer._pending_loss_divisors, None
        if steps < 2:
            return
        rule = trainer._window_rule
        if not weights or rule is None or rule.kind == "sum":
            if not self._skip_logged and (not weights or len(weights) == steps):
                self._skip_logged = True
                logger.warning(
                    "hf_gradtools: `grad_noise_scale` skips every window whose loss is not a mean over known items; "
                    "the loss normalisation here is %s. Declare it with `loss_normalization` (token, sample, ...).",
                    "a sum" if rule is not None and rule.kind == "sum" else "not established",
                )
            return
        if len(weights) == steps:
            self._first = (weights[0].reciprocal().float(), count_items(inputs, rule))

    def after_micro_batch(self, trainer, inputs: dict, loss: torch.Tensor) -> None:
        if self._first is not None:
            weight, items = self._first
            world = trainer.accelerator.num_processes
            self.meter.first_micro_batch(
                trainer.model.parameters(), weight, items, world, loss_scale(trainer.accelerator)
            )
            self._first = None

    def on_window_end(self, trainer) -> None:
        self.meter.window_end(trainer.model.parameters(), loss_scale(trainer.accelerator))

    def log_entries(self, trainer) -> dict[str, float]:
        value, windows = torch.stack([self.meter.estimate.value, self.meter.estimate.num_updates]).tolist()
        return {"grad_noise_scale": value} if windows > 0 else {}

    def state_dict(self) -> dict:
        return self.meter.estimate.state_dict()

    def load_state_dict(self, state, trainer) -> None:
        if state is None:
            logger.info("hf_gradtools: the checkpoint holds no noise-scale averages; they start afresh.")
        else:
            self.meter.estimate.load_state_dict(state)
