"""AutoClip: the total gradient norm clipped to a percentile of every norm seen so far (`clip_algorithm="autoclip"`).

Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks"
(MLSP 2020). At each step the total gradient norm is appended to the history of all norms seen so far, then the
gradient is clipped to the `percentile`-th percentile of that history. `AutoClip` keeps the history;
`AutoClipAlgorithm` is the registered algorithm `autoclip`, whose state (the history) a checkpoint carries.

Example:
    >>> import torch
    >>> clipper = AutoClip(percentile=50)
    >>> [round(clipper.threshold(torch.tensor(n)).item(), 1) for n in [4.0, 2.0]]
    [4.0, 3.0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..distributed import is_sharded, local_tensor
from ..state_fields import FLOAT32_MAX, FieldReader
from .norm import TotalNormClipAlgorithm, _scale_
from .registry import register_clip_algorithm

# `torch.nn.utils.clip_grad_norm_` adds this to the total norm before dividing; AutoClip uses the same formula.
_EPS = 1e-6


@dataclass
class AutoClipResult:
    """What `AutoClip.clip_` did; 0-d tensors on the device.

    Attributes:
        threshold: the percentile of the history, the norm the gradient was clipped to.
        clip_coef: the factor the gradients were multiplied by (`min(1, threshold / (total_norm + 1e-6))`).
        total_norm_post_clip: `total_norm * clip_coef`.
    """

    threshold: torch.Tensor
    clip_coef: torch.Tensor
    total_norm_post_clip: torch.Tensor


class AutoClip:
    """AutoClip: clip the total gradient norm to a percentile of every norm seen so far, this step's included.

    The history lives on the device of the norms (no host sync per step); the percentile is
    `torch.nanquantile(history, percentile / 100, interpolation="linear")`, the same as `numpy.percentile`'s
    default method ("linear"). A non-finite norm is stored as NaN and left out of the percentile. The history
    travels with `state_dict()` / `load_state_dict()` as a plain list of floats, so a resumed run continues it
    exactly.

    Args:
        percentile: in (0, 100]; the paper's recommended range is 5 to 25 (`autoclip_percentile`).

    Example:
        >>> clipper = AutoClip(percentile=50)
        >>> [round(clipper.threshold(torch.tensor(n)).item(), 3) for n in [4.0, 1.0, 2.0, 10.0]]
        [4.0, 2.5, 2.0, 3.0]
        >>> clipper.state_dict()
        {'history': [4.0, 1.0, 2.0, 10.0]}
    """

    def __init__(self, percentile: float = 10.0):
        if (
            isinstance(percentile, bool)
            or not isinstance(percentile, (int, float))
            or not 0 < percentile <= 100  # also rejects NaN
        ):
            raise ValueError(f"`autoclip_percentile` must be a number in (0, 100], got {percentile!r}.")
        self.percentile = float(percentile)
        self._buffer = torch.zeros(0)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def history(self) -> list[float]:
        """Every norm recorded, oldest first (a host sync)."""
        return self._buffer[: self._count].tolist()

    def _append(self, norm: torch.Tensor) -> None:
        if self._buffer.device != norm.device:
            self._buffer = self._buffer.to(norm.device)
        if self._count == self._buffer.numel():
            grown = torch.empty(max(64, 2 * self._count), dtype=torch.float32, device=norm.device)
            grown[: self._count] = self._buffer[: self._count]
            self._buffer = grown
        self._buffer[self._count] = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, math.nan))
        self._count += 1

    def threshold(self, total_norm: torch.Tensor | float) -> torch.Tensor:
        """Append `total_norm` to the history and return the history's percentile (0-d float32, on its device)."""
        norm = torch.as_tensor(total_norm).detach().reshape(()).float()
        self._append(norm)
        return torch.nanquantile(self._buffer[: self._count], self.percentile / 100.0, interpolation="linear")

    def clip_(self, parameters: Iterable[torch.Tensor], total_norm: torch.Tensor | float) -> AutoClipResult:
        """Record `total_norm` and rescale the `.grad` of `parameters` to at most the percentile, in place.

        Args:
            parameters: the tensors whose gradients `total_norm` measured; those without `.grad` are skipped.
            total_norm: the norm of those gradients before this clipping, in any norm type (e.g. from
                `clip_gradients(...).total_norm`, or its `total_norm_post_clip` after value clipping).
        """
        norm = torch.as_tensor(total_norm).detach().reshape(()).float()
        threshold = self.threshold(norm)
        coef = torch.clamp(threshold / (norm + _EPS), max=1.0)
        grads = [p.grad for p in parameters if p.grad is not None]
        if grads:
            # FSDP2 (DTensor) gradients: `total_norm` is already global; each process scales its own shards.
            _scale_(local_tensor(grads) if is_sharded(grads) else grads, coef)
        return AutoClipResult(threshold=threshold, clip_coef=coef, total_norm_post_clip=norm * coef)

    def state_dict(self) -> dict:
        """`{"history": [float, ...]}`, oldest first."""
        return {"history": self.history}

    @staticmethod
    def check_state(state) -> dict:
        """`state` as `state_dict()` writes it, or `StateFieldError` naming the field: each norm of the history is
        a non-negative float32 number, or NaN (a step whose norm was not finite)."""
        fields = FieldReader(state, "AutoClip state must be {'history': [float, ...]}")
        history = fields.numbers("history", low=0.0, high=FLOAT32_MAX, nan=True)
        fields.done()
        return {"history": history}

    def load_state_dict(self, state: dict) -> None:
        """Restore the history saved by `state_dict()` (checked by `check_state`); the next norm is appended."""
        history = self.check_state(state)["history"]
        self._buffer = torch.tensor(history, dtype=torch.float32)
        self._count = len(history)


@register_clip_algorithm("autoclip")
class AutoClipAlgorithm(TotalNormClipAlgorithm):
    """`AutoClip.clip_` as a registered algorithm: `autoclip_percentile`, the history in the checkpoint's state
    file (entry `autoclip`). The norm it records is the one it sees, after value clipping; `max_grad_norm` is not
    used.

    Args:
        percentile: as `AutoClip`'s.
        autoclip: an `AutoClip` to use (its history is updated) instead of a new one.
    """

    def __init__(self, percentile: float = 10.0, autoclip: AutoClip | None = None):
        self.autoclip = autoclip if autoclip is not None else AutoClip(percentile)

    @classmethod
    def from_args(cls, args, model=None) -> AutoClipAlgorithm:
        return cls(args.autoclip_percentile)

    def clip_with_norm(self, named_parameters, norm_type, norm):
        return self.autoclip.clip_([p for _, p in named_parameters], norm).total_norm_post_clip

    def state_dict(self) -> dict:
        return self.autoclip.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.autoclip.load_state_dict(state)

    check_state = staticmethod(AutoClip.check_state)
