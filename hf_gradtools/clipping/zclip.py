"""ZClip: a gradient norm far above its running mean is clipped back towards it (`clip_algorithm="zclip"`).

Kumar, Owen, Ashraf, Rao, Iyer and Shah, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training" (2025). The total
gradient norm `g` (in `clip_norm_type`, after value clipping) of each optimizer step is compared with an
exponential moving average of the past norms, its mean `mu` and variance `var`:

1. warmup: the norms of the first `warmup_steps` steps are collected, and those steps are clipped as `norm` clips
   them (to `max_norm`, if set); after the last one `mu` is their mean and `var` their population variance (a
   non-finite norm is left out of both);
2. then, at each step, `z = (g - mu) / (sqrt(var) + 1e-6)`. Where `z > z_threshold` the gradient is scaled to the
   norm `mu + z_threshold**2 * sqrt(var) / z` (the paper's "reciprocal" clipping: the larger the spike, the closer
   to the mean), capped at `max_norm` when set; otherwise only the `max_norm` cap applies;
3. the statistics follow the norm after clipping, `g'`: `mu <- alpha * mu + (1 - alpha) * g'`, then
   `var <- alpha * var + (1 - alpha) * (g' - mu)**2` with the new `mu`. A non-finite `g'` leaves them as they are.

Scaling uses `clip_grad_norm_`'s formula, `min(1, bound / (g + 1e-6))`. Everything per step is tensor math on
the norm's device (no host sync); only `log_entries` (at logging steps) and `state_dict` read values back. With
DDP the norm is that of the reduced gradients, and with FSDP2 the global norm (`grad_norms`): every process takes
the same decision and keeps the same statistics.

Example:
    >>> import torch
    >>> clipper = ZClip(alpha=0.5, z_threshold=2.0, warmup_steps=2)
    >>> layer = torch.nn.Linear(1, 1, bias=False)
    >>> for g in [1.0, 3.0, 30.0]:  # warmup: mean 2, std 1; then a spike, z = (30 - 2) / 1 = 28
    ...     layer.weight.grad = torch.tensor([[g]])
    ...     post = clipper.clip(list(layer.named_parameters()), 2.0)
    >>> round(post.item(), 4), round(layer.weight.grad.item(), 4)  # 2 + 2**2 * 1 / 28
    (2.1429, 2.1429)
    >>> {key: round(value, 4) for key, value in clipper.log_entries().items()}  # mu = 0.5 * 2 + 0.5 * 2.1429
    {'zclip_mean': 2.0714, 'zclip_std': 0.7089, 'zclip_z': 28.0, 'zclip_clipped': 1}
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..distributed import is_sharded, local_tensor
from ..errors import shown_setting
from ..state_fields import FLOAT32_MAX, FieldReader
from .norm import _EPS, TotalNormClipAlgorithm, _scale_, norm_cap
from .registry import register_clip_algorithm

# Added to the standard deviation before dividing by it, as in the paper's code.
_STD_EPS = 1e-6
_STATE_FORM = (
    "ZClip state must be {'steps': int, 'warmup_norms': [float, ...], 'mu': float or null, 'var': float or null}"
)


def check_zclip_settings(alpha: Any, z_threshold: Any, warmup_steps: Any) -> tuple[float, float, int]:
    """`(alpha, z_threshold, warmup_steps)` checked as `zclip_alpha` (in (0, 1)), `zclip_z_threshold` (finite,
    positive) and `zclip_warmup_steps` (a positive integer): a `ValueError` naming the field otherwise."""
    for name, value, ok, allowed in (
        ("zclip_alpha", alpha, lambda v: 0 < v < 1, "a number in (0, 1)"),
        ("zclip_z_threshold", z_threshold, lambda v: 0 < v < math.inf, "a finite positive number"),
        ("zclip_warmup_steps", warmup_steps, lambda v: isinstance(v, int) and v >= 1, "a positive integer"),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):  # NaN fails `ok`
            raise ValueError(f"`{name}` must be {allowed}, got {shown_setting(value)}.")
    return float(alpha), float(z_threshold), warmup_steps


@register_clip_algorithm("zclip")
class ZClip(TotalNormClipAlgorithm):
    """ZClip (see the module's docstring): `zclip_alpha`, `zclip_z_threshold`, `zclip_warmup_steps`, and
    `max_grad_norm` as the cap; its statistics in the checkpoint's state file (entry `zclip`).

    Args:
        alpha: the EMA decay of the mean and variance, in (0, 1).
        z_threshold: the z-score above which a norm is clipped, positive.
        warmup_steps: the optimizer steps whose norms start the statistics, 1 or more.
        max_norm: the cap of every step's norm (`max_grad_norm`); `None`, 0 or less, NaN: no cap.

    Attributes:
        steps: optimizer steps seen (a host int: the phase is decided on the host).
        mu, var: the statistics, 0-d float32 tensors on the norm's device; `None` during warmup (NaN when every
            warmup norm was non-finite: the first finite norm after warmup starts them, with variance 0).
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        max_norm: float | None = None,
    ):
        self.alpha, self.z_threshold, self.warmup_steps = check_zclip_settings(alpha, z_threshold, warmup_steps)
        self.max_norm = norm_cap(max_norm)
        self.steps = 0
        self._warmup = torch.full((self.warmup_steps,), math.nan)  # this run's warmup norms, NaN where non-finite
        self.mu: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self._z: torch.Tensor | None = None  # the last step's z-score, and whether it clipped (for the logs)
        self._clipped: torch.Tensor | None = None

    @classmethod
    def from_args(cls, args, model=None) -> ZClip:
        return cls(args.zclip_alpha, args.zclip_z_threshold, args.zclip_warmup_steps, args.max_grad_norm)

    @property
    def in_warmup(self) -> bool:
        return self.mu is None

    def _move(self, device: torch.device) -> None:
        if self._warmup.device != device:
            self._warmup = self._warmup.to(device)
            self.mu, self.var = (None if t is None else t.to(device) for t in (self.mu, self.var))

    def clip_with_norm(self, named_parameters, norm_type, norm):
        g = norm.detach().reshape(()).float()
        self._move(g.device)
        grads = [p.grad for _, p in named_parameters if p.grad is not None]
        grads = local_tensor(grads) if is_sharded(grads) else grads
        if self.in_warmup:
            self._warmup[self.steps] = torch.where(torch.isfinite(g), g, torch.full_like(g, math.nan))
            self.steps += 1
            if self.steps == self.warmup_steps:
                self._start_statistics()
            if not self.max_norm:
                return norm
            coef = torch.clamp(self.max_norm / (g + _EPS), max=1.0)  # as `norm` clips
        else:
            std = self.var.sqrt()
            z = (g - self.mu) / (std + _STD_EPS)
            clipped = z > self.z_threshold  # False for a NaN z
            bound = torch.where(clipped, self.mu + self.z_threshold**2 * std / z, torch.full_like(g, math.inf))
            if self.max_norm:
                bound = torch.clamp(bound, max=self.max_norm)
            ratio = bound / (g + _EPS)
            coef = torch.where(ratio < 1, ratio, torch.ones_like(ratio))  # NaN g: left as it is
            self._update(g * coef)
            self._z, self._clipped = z, clipped
            self.steps += 1
        if grads:
            _scale_(grads, coef)
        return norm * coef

    def _start_statistics(self) -> None:
        """The mean and population variance of the finite warmup norms (NaN if none is)."""
        finite = torch.isfinite(self._warmup)
        count = finite.sum()
        zero = torch.zeros_like(self._warmup)
        self.mu = torch.where(finite, self._warmup, zero).sum() / count
        self.var = torch.where(finite, (self._warmup - self.mu) ** 2, zero).sum() / count

    def _update(self, post: torch.Tensor) -> None:
        a = self.alpha
        mu = a * self.mu + (1 - a) * post
        var = a * self.var + (1 - a) * (post - mu) ** 2
        started = torch.isfinite(self.mu)  # else every warmup norm was non-finite: start at this norm
        mu, var = torch.where(started, mu, post), torch.where(started, var, torch.zeros_like(var))
        finite = torch.isfinite(post)
        self.mu, self.var = torch.where(finite, mu, self.mu), torch.where(finite, var, self.var)

    def log_entries(self) -> dict[str, float]:
        """After warmup: `zclip_mean` and `zclip_std` (the statistics the next step uses), the last step's
        `zclip_z` and `zclip_clipped` (1 or 0); one host sync. `{}` during warmup."""
        if self._z is None:
            return {}
        mean, std, z, clipped = torch.stack([self.mu, self.var.sqrt(), self._z, self._clipped.float()]).tolist()
        return {"zclip_mean": mean, "zclip_std": std, "zclip_z": z, "zclip_clipped": int(clipped)}

    def state_dict(self) -> dict:
        """`{"steps": int, "warmup_norms": [float, ...], "mu": float or None, "var": float or None}`: the warmup
        norms so far (NaN for a non-finite one) while warming up, then `[]` and the statistics."""
        if self.in_warmup:
            return {"steps": self.steps, "warmup_norms": self._warmup[: self.steps].tolist(), "mu": None, "var": None}
        mu, var = torch.stack([self.mu, self.var]).tolist()
        return {"steps": self.steps, "warmup_norms": [], "mu": mu, "var": var}

    def load_state_dict(self, state: Any) -> None:
        """Restore what `state_dict()` gave, read back from a checkpoint: a `StateFieldError` (a `ValueError`)
        naming the field if it is not what this instance writes (a wrong type, a negative variance, a NaN
        outside the warmup norms, more warmup norms than `warmup_steps` allows, or fields that disagree)."""
        fields = FieldReader(state, _STATE_FORM)
        steps = fields.integer("steps")
        norms = fields.numbers("warmup_norms", low=0.0, high=FLOAT32_MAX, nan=True)
        mu, var = _statistic(fields, "mu"), _statistic(fields, "var")
        fields.done()
        fields.check((mu is None) == (var is None), "var", f"must be null exactly when `mu` is, got {var!r}")
        if mu is None:
            fields.check(
                len(norms) < self.warmup_steps,
                "warmup_norms",
                f"holds {len(norms)} norms, but the statistics start after `zclip_warmup_steps`={self.warmup_steps} "
                "(with `mu` and `var` set and no warmup norms)",
            )
            fields.check(len(norms) == steps, "steps", f"must equal the {len(norms)} warmup norms, got {steps}")
        else:
            fields.check(not norms, "warmup_norms", "must be empty once `mu` and `var` are set")
            fields.check(steps > 0, "steps", "must be positive once `mu` and `var` are set, got 0")
            fields.check(math.isnan(mu) == math.isnan(var), "var", f"must be NaN exactly when `mu` is, got {var!r}")
        self.steps = steps
        self._warmup = torch.full((self.warmup_steps,), math.nan)
        self._warmup[: len(norms)] = torch.tensor(norms, dtype=torch.float32)
        self.mu = None if mu is None else torch.tensor(mu, dtype=torch.float32)
        self.var = None if var is None else torch.tensor(var, dtype=torch.float32)
        self._z = self._clipped = None


def _statistic(fields: FieldReader, key: str) -> float | None:
    """`mu` or `var`: a non-negative float32 number, or null (warmup), or NaN (every warmup norm was non-finite)."""
    value = fields.state.get(key, 0.0)  # a missing field is reported by `number`
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return fields.entry(key, lambda v: v)
    return fields.number(key, low=0.0, high=FLOAT32_MAX)
