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
whose gradient norm grew most relative to its own mean over the history.

Where the gradients live on an accelerator, the rule runs on the device (`spike_device.py`) and the step is skipped
by the fused optimizer's `found_inf` flag (`skip.py`): no host read until the next training log or checkpoint,
which reads the steps since the last one at once, warns for each skip and stops training after `max_spike_skips`
in a row; the trainer then sets the scheduler back by the steps it stepped past. Between a skip and that read, the
learning rate runs one schedule position ahead per skip. Without a fused optimizer and a `LambdaLR` schedule (or
on the CPU, where a read costs nothing), the decision is read back at each optimizer step and the skip is the
host's.

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
from .skip import device_skip_blocker
from .spike_device import DeviceSpikeHistory, growth_leader

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
    decide_on_device: bool | None = None  # `None`: on the device where the gradients are not on the CPU

    def __init__(self, window: int, sigma: float, min_history: int, max_consecutive: int, norm_type: float):
        self.history = SpikeHistory(window, sigma, min_history)
        self.groups = SpikeHistory(window, sigma, min_history)  # per-layer-group norms, for the warning
        self.max_consecutive, self.norm_type = max_consecutive, norm_type
        self.skips = self.consecutive = 0
        self.group_keys: list[str] = []
        self._loss: torch.Tensor | None = None
        self._grouper: LayerNormGrouper | None = None
        self._step: tuple | None = None
        self._on_device: bool | None = None  # decided at the run's first step
        self._device_histories: tuple[DeviceSpikeHistory, DeviceSpikeHistory | None] | None = None
        self._pending: list[tuple[int, torch.Tensor]] = []  # steps decided on the device, not read yet

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
        loss = self._loss if self._loss is not None else torch.full((), math.nan, device=device)
        self._loss = None
        loss = loss.to(device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loss)  # the mean over the processes, as logged
            loss = loss / dist.get_world_size()
        return loss

    def decides_on_device(self, trainer, device: torch.device) -> bool:
        """Whether this run's decisions stay on the device (decided once, at the first step, and said so)."""
        if self._on_device is None:
            wanted = self.decide_on_device if self.decide_on_device is not None else device.type != "cpu"
            blocker = device_skip_blocker(trainer.optimizer, trainer.lr_scheduler) if wanted else None
            if blocker is not None:
                logger.info(
                    "hf_gradtools: the spike guard reads its decision back at each optimizer step: %s.", blocker
                )
            self._on_device = wanted and blocker is None
        return self._on_device

    def _group_norms(self, trainer, step: ClipStep) -> torch.Tensor:
        if self._grouper is None or self._grouper.names != step.names:
            self._grouper = LayerNormGrouper(trainer.model, step.names)
            if list(self._grouper.groups) != self.group_keys:  # other groups: their history starts again
                self.group_keys = list(self._grouper.groups)
                self.groups.values.clear()
                if self._device_histories is not None:
                    self._device_histories = (self._device_histories[0], None)
        return self._grouper.group_norms(step.result.param_norms, self.norm_type).float()

    def should_skip(self, trainer, step: ClipStep) -> bool | torch.Tensor:
        result = step.result
        groups = self._group_norms(trainer, step)
        loss = self._window_loss(result.total_norm.device)
        if self.decides_on_device(trainer, result.total_norm.device):
            return self._decide_on_device(loss, result.total_norm, groups)
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

    # ---- deciding on the device ----

    def _histories(self, device: torch.device) -> tuple[DeviceSpikeHistory, DeviceSpikeHistory]:
        """The device's histories, built from the host's (empty, or as a checkpoint left them) on first use."""
        history, groups = self._device_histories or (None, None)
        window, sigma, minimum = self.history.window, self.history.sigma, self.history.min_history
        if history is None:
            history = DeviceSpikeHistory.from_rows(self.history.values, 2, window, sigma, minimum, device)
        if groups is None:
            columns = len(self.group_keys)
            groups = DeviceSpikeHistory.from_rows(self.groups.values, columns, window, sigma, minimum, device)
        self._device_histories = (history, groups)
        return history, groups

    def _decide_on_device(self, loss, total_norm, groups) -> torch.Tensor:
        values = torch.stack([loss, total_norm.float()]).to(torch.float64)
        history, group_history = self._histories(values.device)
        own, which, limits = history.exceeds(values)
        flag = agree_across_ranks(own)
        if groups.numel():
            layer = growth_leader(groups, group_history.means())
        else:
            layer = torch.zeros((), dtype=torch.long, device=values.device)
        self._step = ("device", values, groups, own, which, limits, history.count, layer, flag)
        return flag

    def _record_on_device(self, step: ClipStep) -> None:
        _, values, groups, own, which, limits, count, layer, flag = self._step
        self._step = None
        history, group_history = self._histories(values.device)
        if isinstance(step.skipped, torch.Tensor):
            skipped = step.skipped
        else:  # a host decision (another guard's, or this step's, read on the host): a fill, no copy to the device
            skipped = torch.full((), bool(step.skipped), dtype=torch.bool, device=values.device)
        keep = ~skipped & torch.isfinite(values).all()
        history.add(values, keep)
        group_history.add(groups, keep)
        flags = torch.stack([flag, own, skipped]).to(torch.float64)
        extra = torch.stack([which, count, layer]).to(torch.float64)
        self._pending.append((step.step, torch.cat([flags, values, limits, extra])))

    def read_back(self, trainer) -> None:
        """Read the steps decided on the device since the last read (one host read): warn for each skip, count it,
        and stop after `max_spike_skips` skips in a row. (The trainer sets the scheduler back.)"""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rows = torch.stack([row for _, row in pending]).tolist()
        stop = None
        for (step, _), row in zip(pending, rows, strict=True):
            flag, own, skipped, which, count, layer = (*row[:3], *row[7:])
            if not skipped:
                self.consecutive = 0
            elif flag:
                spiked = int(which) if own else None
                what = None if spiked is None else (row[3 + spiked], row[5 + spiked], int(count))
                keys = self.group_keys
                self._warn_skip(step, what, spiked, keys[int(layer)] if keys else "unknown")
                self.skips += 1
                self.consecutive += 1
                if self.consecutive >= self.max_consecutive and stop is None:
                    stop = (step, self.consecutive)
        if stop is not None:
            error = self._stop_error(*stop)
            last = pending[-1][0]
            if last != stop[0]:  # decided on the device: the run went on until this read
                error.args = (
                    f"{error.args[0]} The decisions kept on the device were read at step {last}: "
                    f"{self.consecutive} skipped in a row by then.",
                )
            raise error

    # ---- the host's decision ----

    def _warn(self, step: int, values: list[float], group_values: list[float], spiked: int | None) -> None:
        what = None
        if spiked is not None:
            what = (values[spiked], self.history.threshold(spiked), len(self.history.values))
        self._warn_skip(step, what, spiked, self.spike_layer(group_values))

    def _warn_skip(self, step: int, what: tuple | None, spiked: int | None, layer: str) -> None:
        """The warning for a skipped step; `what`: (value, threshold, steps of history), `None` when another
        process saw the spike."""
        if what is None:
            told = "a spike on another process"
        else:
            value, limit, steps = what
            told = (
                f"{QUANTITIES[spiked]} {value:.6g} > {limit:.6g} (mean + {self.history.sigma:g} std of the "
                f"last {steps} steps)"
            )
        logger.warning(
            "hf_gradtools: step %d skipped as a spike: %s; the layer group that grew most: %s. %d spike skip(s) "
            "so far.",
            step,
            told,
            layer,
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

    def _stop_error(self, step: int, consecutive: int) -> LossSpikeError:
        return LossSpikeError(
            f"{consecutive} optimizer steps in a row were skipped as loss or gradient spikes (up to step "
            f"{step}), the limit set by `max_spike_skips`={self.max_consecutive}; training stopped. The "
            "run has moved away from its history: lower the learning rate, raise `spike_sigma`, or look at the "
            "data of these steps."
        )

    def after_clip(self, trainer, step: ClipStep) -> None:
        if self._step is not None and self._step[0] == "device":
            self._record_on_device(step)
            return
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
            raise self._stop_error(step.step, self.consecutive)

    def log_entries(self, trainer) -> dict[str, float]:
        return {"spike_skips": self.skips}

    def history_rows(self) -> tuple[list[list[float]], list[list[float]]]:
        """The kept steps' (loss, norm) rows and group-norm rows, oldest first, wherever the history lives."""
        if self._device_histories is None:
            return [list(r) for r in self.history.values], [list(r) for r in self.groups.values]
        history, groups = self._device_histories
        return history.rows(), groups.rows() if groups is not None else [list(r) for r in self.groups.values]

    # ---- checkpoints ----

    def state_dict(self) -> dict:
        self.read_back(None)  # GradTrainer has read back before its save: a no-op then
        rows, group_rows = self.history_rows()
        return {
            "skips": self.skips,
            "consecutive": self.consecutive,
            "losses": [row[0] for row in rows],
            "grad_norms": [row[1] for row in rows],
            "groups": list(self.group_keys),
            "group_norms": group_rows,
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
        self._device_histories = None  # rebuilt from these on the device at the next step
