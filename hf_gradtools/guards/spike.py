"""Skip-on-spike: an optimizer step whose loss or gradient norm is far above the recent ones is not applied.

A loss spike (a gradient norm 10-1000x its usual size, SPAM, ICLR 2025) passes the non-finite guard, and one such
update can undo hours of training. OLMo-core's `SkipStepOptimizer` skips the update when the loss or the gradient
norm exceeds mean + 6 standard deviations of the last 128 steps; `SpikeHistory` is that rule:

- the step's value is the window's mean training loss (as the Trainer logs it, averaged over the processes) and the
  total gradient norm before clipping (in `clip_norm_type`, global under DDP/FSDP2);
- each is compared with mean + `spike_sigma` x population standard deviation of the same quantity over the previous
  up to `spike_window` steps that were not skipped, once at least `spike_min_history` of them exist;
- a skipped step is not added to the history, and `max_spike_skips` skipped steps in a row stop training.

`SkipSpikes`, the trainer component (`skip_spike_steps=True`), skips through the same mechanism as the non-finite
guard (`skip.py`), logs `spike_skips`, and names in its warning the layer group (`embeddings`, `layer.<i>`, `head`)
whose gradient norm grew most relative to its own mean over the history. It reads the step's values back once per
optimizer step (a skip is the host's decision).

Example:
    >>> history = SpikeHistory(window=4, sigma=3.0, min_history=3)
    >>> for loss in (1.0, 1.1, 0.9):
    ...     history.add([loss])
    >>> round(history.threshold(0), 4), history.exceeds([1.2]), history.exceeds([5.0])
    (1.2449, None, 0)
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..components import ClipStep, TrainerComponent, warn_starts_afresh
from ..distributed import agree_across_ranks
from ..errors import LossSpikeError
from ..monitoring import LayerNormGrouper
from ..state_fields import FieldReader

logger = logging.getLogger(__name__)

QUANTITIES = ("loss", "grad_norm")


def _is_norm(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


class SpikeHistory:
    """The values of the last `window` steps that were not skipped, one list per quantity, and the spike rule."""

    def __init__(self, window: int = 128, sigma: float = 6.0, min_history: int = 20):
        self.window, self.sigma, self.min_history = window, sigma, min_history
        self.values: deque[list[float]] = deque(maxlen=window)

    def add(self, values: Sequence[float]) -> None:
        self.values.append([float(v) for v in values])

    def threshold(self, index: int) -> float | None:
        """mean + sigma x population std of quantity `index` over the history; `None` before `min_history`."""
        if len(self.values) < self.min_history:
            return None
        column = [row[index] for row in self.values]
        mean = math.fsum(column) / len(column)
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in column) / len(column))
        return mean + self.sigma * std

    def exceeds(self, values: Sequence[float]) -> int | None:
        """The index of the first quantity above its threshold, or `None` (also before `min_history`)."""
        for index, value in enumerate(values):
            limit = self.threshold(index)
            if limit is not None and math.isfinite(value) and value > limit:
                return index
        return None


class SkipSpikes(TrainerComponent):
    """`skip_spike_steps`: skip an optimizer step whose loss or pre-clip gradient norm is a spike (see above)."""

    name = "spike_guard"
    every_step = True

    def __init__(self, window: int, sigma: float, min_history: int, max_consecutive: int, norm_type: float):
        self.history = SpikeHistory(window, sigma, min_history)
        self.groups = SpikeHistory(window, sigma, min_history)  # per-layer-group norms, for the warning
        self.max_consecutive, self.norm_type = max_consecutive, norm_type
        self.skips = self.consecutive = 0
        self.group_keys: list[str] = []
        self._loss: torch.Tensor | None = None
        self._grouper: LayerNormGrouper | None = None
        self._step: tuple[list[float], list[float], int | None] | None = None

    @classmethod
    def from_args(cls, settings, model) -> SkipSpikes | None:
        if not settings.skip_spike_steps:
            return None
        return cls(
            settings.spike_window,
            settings.spike_sigma,
            settings.spike_min_history,
            settings.max_spike_skips,
            settings.clip_norm_type,
        )

    def after_micro_batch(self, trainer, inputs: dict, loss: torch.Tensor) -> None:
        # The micro-batch losses `training_step` returns add up to the window's loss, as the Trainer logs it.
        loss = loss.detach().float().mean()
        self._loss = loss if self._loss is None else self._loss + loss

    def _window_loss(self, device: torch.device) -> torch.Tensor:
        loss = self._loss if self._loss is not None else torch.tensor(math.nan)
        self._loss = None
        loss = loss.to(device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loss)  # the mean over the processes, as logged
            loss = loss / dist.get_world_size()
        return loss

    def should_skip(self, trainer, step: ClipStep) -> bool:
        result = step.result
        if self._grouper is None or self._grouper.names != step.names:
            self._grouper = LayerNormGrouper(trainer.model, step.names)
            if list(self._grouper.groups) != self.group_keys:  # other groups: their history starts again
                self.group_keys = list(self._grouper.groups)
                self.groups.values.clear()
        groups = self._grouper.group_norms(result.param_norms, self.norm_type).float()
        loss = self._window_loss(result.total_norm.device)
        # One read back per step: the loss, the norm and the groups' norms together.
        values = torch.cat([torch.stack([loss, result.total_norm.float()]), groups.to(loss.device)]).tolist()
        step_values, group_values = values[:2], values[2:]
        spiked = self.history.exceeds(step_values)
        flag = torch.tensor(spiked is not None, device=result.total_norm.device)
        skip = bool(agree_across_ranks(flag))
        self._step = (step_values, group_values, skip)
        if skip:
            self._warn(step.step, step_values, group_values, spiked)
        return skip

    def _warn(self, step: int, values: list[float], group_values: list[float], spiked: int | None) -> None:
        if spiked is None:  # another process saw the spike
            what = "a spike on another process"
        else:
            limit = self.history.threshold(spiked)
            what = (
                f"{QUANTITIES[spiked]} {values[spiked]:.6g} > {limit:.6g} (mean + {self.history.sigma:g} std of the "
                f"last {len(self.history.values)} steps)"
            )
        logger.warning(
            "hf_gradtools: step %d skipped as a spike: %s; the layer group that grew most: %s. %d spike skip(s) "
            "so far.",
            step,
            what,
            self.spike_layer(group_values),
            self.skips + 1,
        )

    def spike_layer(self, group_values: list[float]) -> str:
        """The group whose norm is largest relative to its own mean over the history (`embeddings`, `layer.<i>`,
        `head`); by its size alone before any history."""
        rows = list(self.groups.values)
        best, best_ratio = None, -math.inf
        for i, (group, value) in enumerate(zip(self.group_keys, group_values, strict=True)):
            mean = math.fsum(row[i] for row in rows) / len(rows) if rows else 1.0
            ratio = value / mean if mean > 0 else (math.inf if value > 0 else 0.0)
            if ratio > best_ratio:
                best, best_ratio = group, ratio
        return best if best is not None else "unknown"

    def after_clip(self, trainer, step: ClipStep) -> None:
        values, group_values, spike = self._step or ([math.nan, math.nan], [], False)
        self._step = None
        if not step.skipped:
            self.consecutive = 0
            if all(math.isfinite(v) for v in values):
                self.history.add(values)
                self.groups.add(group_values)
            return
        if not spike:
            return  # skipped by another guard: neither counted nor added
        self.skips += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise LossSpikeError(
                f"{self.consecutive} optimizer steps in a row were skipped as loss or gradient spikes (up to step "
                f"{step.step}), the limit set by `max_spike_skips`={self.max_consecutive}; training stopped. The "
                "run has moved away from its history: lower the learning rate, raise `spike_sigma`, or look at the "
                "data of these steps."
            )

    def log_entries(self, trainer) -> dict[str, float]:
        return {"spike_skips": self.skips}

    # ---- checkpoints ----

    def state_dict(self) -> dict:
        return {
            "skips": self.skips,
            "consecutive": self.consecutive,
            "losses": [row[0] for row in self.history.values],
            "grad_norms": [row[1] for row in self.history.values],
            "groups": list(self.group_keys),
            "group_norms": [list(row) for row in self.groups.values],
        }

    @staticmethod
    def check_state(state) -> dict:
        """`state` as `state_dict()` writes it, or `StateFieldError` naming the field."""
        fields = FieldReader(state, "the spike guard's state")
        skips, consecutive = fields.integer("skips"), fields.integer("consecutive")
        losses, norms = fields.numbers("losses"), fields.numbers("grad_norms", low=0.0)
        groups = fields.strings("groups")
        rows = fields._get("group_norms")
        fields.check(isinstance(rows, list), "group_norms", "must be a list of lists of norms")
        for i, row in enumerate(rows):
            ok = isinstance(row, list) and len(row) == len(groups)
            ok = ok and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in row
            )
            fields.check(ok, f"group_norms[{i}]", f"must be a list of {len(groups)} non-negative norms")
        fields.done()
        fields.check(consecutive <= skips, "consecutive", f"must be at most `skips`={skips}, got {consecutive}")
        fields.check(len(losses) == len(norms), "grad_norms", f"must hold as many values as `losses` ({len(losses)})")
        fields.check(len(rows) <= len(losses), "group_norms", "must hold at most as many rows as `losses`")
        return state

    def load_state_dict(self, state, trainer) -> None:
        if state is None:
            warn_starts_afresh(trainer, self.name)
            return
        state = self.check_state(state)
        self.skips, self.consecutive = state["skips"], state["consecutive"]
        self.history.values.clear()
        for loss, norm in zip(state["losses"], state["grad_norms"], strict=True):
            self.history.add([loss, norm])
        self.group_keys = list(state["groups"])
        self.groups.values.clear()
        for row in state["group_norms"]:
            self.groups.add(row)
