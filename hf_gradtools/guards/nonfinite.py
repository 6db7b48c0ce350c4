"""The non-finite gradient guard: find NaN/Inf gradients, count skipped steps, stop after too many in a row.

`has_nonfinite(grads)` is exact and needs no host sync: one read of each gradient (`torch.aminmax`, which
propagates NaN and cannot overflow; a tensor is finite exactly when its minimum and maximum are).
`norms_nonfinite(param_norms)` is the free alternative from the norms clipping already computed.
`agree_across_ranks` makes every DDP process take the same decision. `NonFiniteGuard` counts the skips and raises
`NonFiniteGradientError` after `max_consecutive` skipped steps in a row.

Example:
    >>> import torch
    >>> grads = [torch.tensor([1.0, 2.0]), torch.tensor([float("nan")])]
    >>> bool(has_nonfinite(grads)), nonfinite_names(["a.weight", "b.bias"], grads)
    (True, ['b.bias'])
    >>> guard = NonFiniteGuard(max_consecutive=2)
    >>> guard.record(True, step=7, names=["b.bias"])
    >>> guard.record(True, step=8, names=["b.bias"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hf_gradtools.errors.NonFiniteGradientError: Non-finite gradients at 2 consecutive optimizer steps (7 to 8)...
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..components import ClipStep, TrainerComponent, warn_starts_afresh
from ..distributed import agree_across_ranks, is_sharded, local_tensor
from ..errors import NonFiniteGradientError
from ..state_fields import FieldReader

# How many parameter names a log line or an error lists.
logger = logging.getLogger(__name__)

SHOWN_NAMES = 5


def finite_mask(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per tensor, whether every element is finite: a bool 1-D tensor on the first tensor's device; no sync.

    Empty tensors count as finite. For FSDP2 (DTensor) gradients, only this process's shards are checked: agree
    with the other processes through `agree_across_ranks`.
    """
    if not grads:
        return torch.ones(0, dtype=torch.bool)
    grads = local_tensor(grads) if is_sharded(grads) else list(grads)
    device = grads[0].device
    flags = []
    for grad in grads:
        if grad.numel() == 0:
            flags.append(torch.ones((), dtype=torch.bool, device=device))
            continue
        low, high = torch.aminmax(grad.detach())
        flags.append((torch.isfinite(low) & torch.isfinite(high)).to(device))
    return torch.stack(flags)


def has_nonfinite(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-d bool tensor on the gradients' device: whether any element of `grads` is NaN or +-Inf. No host sync.

    Exact, at the cost of one read of every gradient (about what one norm pass costs).
    """
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    return ~finite_mask(grads).all()


def norms_nonfinite(param_norms: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: whether any per-tensor norm (e.g. `clip_gradients(...).param_norms`) is NaN or Inf.

    Free, and never misses a NaN/Inf gradient (its norm is NaN/Inf in every norm type). It also fires when a
    finite gradient's norm overflows its dtype (an L2 norm above about 1.8e19 in float32), a step that norm
    clipping would zero anyway.
    """
    return ~torch.isfinite(param_norms).all()


def nonfinite_names(names: Sequence[str], grads: Sequence[torch.Tensor], limit: int = SHOWN_NAMES) -> list[str]:
    """The first `limit` names (in the given order) whose gradient holds NaN or Inf. Syncs with the host.

    Call it only on a step that is skipped, to name the culprits.
    """
    if len(names) != len(grads):
        raise ValueError(f"`names` has {len(names)} entries but `grads` has {len(grads)}; give one name per tensor.")
    if not grads:
        return []
    bad = (~finite_mask(grads)).nonzero().flatten()[:limit].tolist()
    return [names[i] for i in bad]


def skip_message(step: int, names: Sequence[str], total_skips: int) -> str:
    """The one log line of a skipped step.

    Example:
        >>> skip_message(12, ["classifier.weight"], total_skips=3)
        'Skipped optimizer step 12: non-finite (NaN/Inf) gradients in classifier.weight (3 skipped so far).'
    """
    where = ", ".join(names) if names else "(parameter names not given)"
    return f"Skipped optimizer step {step}: non-finite (NaN/Inf) gradients in {where} ({total_skips} skipped so far)."


class NonFiniteGuard:
    """Counts optimizer steps skipped for non-finite gradients; stops training after too many in a row.

    Keeps only counts (`nonfinite_skips` in all, `consecutive` in the current run of skips); the caller decides
    to skip (`has_nonfinite`, agreed with `agree_across_ranks`) and reports each step with `record`.

    Args:
        max_consecutive: raise `NonFiniteGradientError` at this many skipped steps in a row, at least 1
            (`max_nonfinite_skips`).
    """

    def __init__(self, max_consecutive: int = 10):
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"`max_nonfinite_skips` must be a positive integer, got {max_consecutive!r}.")
        self.max_consecutive = max_consecutive
        self.nonfinite_skips = 0
        self.consecutive = 0
        self.first_skipped_step: int | None = None

    def record(self, skipped: bool, step: int, names: Sequence[str] = ()) -> None:
        """Count one optimizer step, skipped or not.

        Args:
            skipped: whether this step was skipped for non-finite gradients.
            step: its number (the `global_step` it produces), used in the error.
            names: a few parameters with non-finite gradients (`nonfinite_names`), used in the error.

        Raises:
            NonFiniteGradientError: this was the `max_consecutive`-th skipped step in a row.
        """
        if not skipped:
            self.consecutive = 0
            self.first_skipped_step = None
            return
        self.nonfinite_skips += 1
        self.consecutive += 1
        if self.first_skipped_step is None:
            self.first_skipped_step = step
        if self.consecutive >= self.max_consecutive:
            where = ", ".join(names) if names else "(parameter names not given)"
            raise NonFiniteGradientError(
                f"Non-finite gradients at {self.consecutive} consecutive optimizer steps "
                f"({self.first_skipped_step} to {step}), the limit set by `max_nonfinite_skips`="
                f"{self.max_consecutive}; training stopped at step {step}. Parameters with NaN/Inf gradients at "
                f"step {step}: {where}. Lower the learning rate, check the data and the loss for NaN, or use bf16 "
                "instead of fp16."
            )

    def state_dict(self) -> dict:
        return {
            "nonfinite_skips": self.nonfinite_skips,
            "consecutive": self.consecutive,
            "first_skipped_step": self.first_skipped_step,
        }

    @staticmethod
    def check_state(state) -> dict:
        """`state` as `state_dict()` writes it, or `StateFieldError` naming the field: non-negative counts, the
        current run of skips no longer than all of them, and a first skipped step (1 or more) exactly while a run
        of skips is under way."""
        fields = FieldReader(
            state,
            "NonFiniteGuard state must be {'nonfinite_skips': int, 'consecutive': int, 'first_skipped_step': int "
            "or None}",
        )
        skips = fields.integer("nonfinite_skips")
        consecutive = fields.integer("consecutive")
        first = fields.integer("first_skipped_step", low=1, nullable=True)
        fields.done()
        fields.check(
            consecutive <= skips, "consecutive", f"must be at most `nonfinite_skips`={skips}, got {consecutive}"
        )
        fields.check(
            (first is None) == (consecutive == 0),
            "first_skipped_step",
            f"must be null exactly when `consecutive` is 0, got {first!r} with `consecutive`={consecutive}",
        )
        return {"nonfinite_skips": skips, "consecutive": consecutive, "first_skipped_step": first}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counts saved by `state_dict()` (checked by `check_state`)."""
        state = self.check_state(state)
        self.nonfinite_skips, self.consecutive = state["nonfinite_skips"], state["consecutive"]
        self.first_skipped_step = state["first_skipped_step"]


class SkipNonFinite(TrainerComponent):
    """`skip_nonfinite_grads`: a step whose gradients hold NaN or Inf before clipping is skipped (one host sync a
    step: the decision is the host's), and `nonfinite_skips` is logged."""

    name = "nonfinite_guard"
    every_step = True
    check_state = staticmethod(NonFiniteGuard.check_state)

    def __init__(self, max_consecutive: int):
        self.guard = NonFiniteGuard(max_consecutive)
        self._found = False
        self._names: list[str] = []

    @classmethod
    def from_args(cls, settings, model) -> SkipNonFinite | None:
        return cls(settings.max_nonfinite_skips) if settings.skip_nonfinite_grads else None

    def should_skip(self, trainer, step: ClipStep) -> bool:
        norms = step.result.param_norms
        self._found = bool(agree_across_ranks(norms_nonfinite(norms)))
        if not self._found:
            self._names = []
            return False
        # From the norms before clipping: clipping by a NaN norm spreads NaN to every gradient.
        bad = (~torch.isfinite(norms)).nonzero().flatten()[:SHOWN_NAMES].tolist()
        self._names = [step.names[i] for i in bad]
        logger.warning(skip_message(step.step, self._names, self.guard.nonfinite_skips + 1))
        return True

    def after_clip(self, trainer, step: ClipStep) -> None:
        self.guard.record(self._found, step.step, self._names)

    def log_entries(self, trainer) -> dict[str, float]:
        return {"nonfinite_skips": self.guard.nonfinite_skips}

    def state_dict(self) -> dict:
        return self.guard.state_dict()

    def load_state_dict(self, state, trainer) -> None:
        if state is None:
            warn_starts_afresh(trainer, self.name)
        else:
            self.guard.load_state_dict(state)
