"""The spike rule kept on the device: the history, the thresholds and the decision are tensors, never read back.

`DeviceSpikeHistory` holds the same history as `SpikeHistory` (the values of the last `window` steps that were
not skipped, one column per quantity) in a ring of float64 rows on the device, and takes a row in only where a
0-dim `keep` flag says so (`torch.where`, no Python `if` on a tensor). Its thresholds are mean + `sigma` x
population standard deviation of each column over the rows held, as `SpikeHistory.threshold` computes them.

Example:
    >>> import torch
    >>> history = DeviceSpikeHistory(columns=1, window=4, sigma=3.0, min_history=3, device=torch.device("cpu"))
    >>> for loss in (1.0, 1.1, 0.9):
    ...     history.add(torch.tensor([loss], dtype=torch.float64), torch.tensor(True))
    >>> history.add(torch.tensor([9.0]), torch.tensor(False))  # a skipped step: not taken in
    >>> limits, ready = history.thresholds()
    >>> round(limits.item(), 4), bool(ready), history.rows()
    (1.2449, True, [[1.0], [1.1], [0.9]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class DeviceSpikeHistory:
    """The last `window` kept rows of `columns` values, on `device`; `add`, `thresholds` and `means` never sync."""

    def __init__(self, columns: int, window: int, sigma: float, min_history: int, device: torch.device):
        self.window, self.sigma, self.min_history = window, sigma, min_history
        self.buffer = torch.zeros(window, columns, dtype=torch.float64, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)  # the next row written
        self.count = torch.zeros((), dtype=torch.long, device=device)  # rows held, up to `window`
        self._rows = torch.arange(window, device=device)

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Sequence[float]],
        columns: int,
        window: int,
        sigma: float,
        min_history: int,
        device: torch.device,
    ) -> DeviceSpikeHistory:
        """A history holding `rows` (oldest first; only the last `window` are kept), as a checkpoint lists them."""
        history = cls(columns, window, sigma, min_history, device)
        rows = [list(map(float, row)) for row in rows][-window:]
        if rows:
            history.buffer[: len(rows)] = torch.tensor(rows, dtype=torch.float64, device=device)
            history.count.fill_(len(rows))
            history.position.fill_(len(rows) % window)
        return history

    def add(self, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Take `values` (one per column) in as the newest row where `keep` (a 0-dim bool tensor) is true."""
        at = self.position.view(1)
        current = self.buffer.index_select(0, at)
        row = torch.where(keep, values.to(self.buffer).view(1, -1), current)
        self.buffer.index_copy_(0, at, row)
        kept = keep.to(torch.long)
        self.position = (self.position + kept) % self.window
        self.count = torch.clamp(self.count + kept, max=self.window)

    def _mean(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        held = (self._rows < self.count).to(torch.float64).unsqueeze(1)  # the ring fills rows 0.. in order
        n = self.count.clamp(min=1).to(torch.float64)
        return (self.buffer * held).sum(0) / n, held, n

    def means(self) -> torch.Tensor:
        """Each column's mean over the rows held; 1 where none is held yet."""
        means = self._mean()[0]
        return torch.where(self.count > 0, means, torch.ones_like(means))

    def thresholds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mean + sigma x population std of each column, and whether `min_history` rows are held (0-dim bool)."""
        mean, held, n = self._mean()
        variance = (((self.buffer - mean) * held) ** 2).sum(0) / n
        return mean + self.sigma * variance.sqrt(), self.count >= self.min_history

    def exceeds(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Whether a finite value is above its threshold (0-dim bool), the first such column (0 when none), and
        the thresholds."""
        limits, ready = self.thresholds()
        values = values.to(self.buffer)
        above = ready & torch.isfinite(values) & (values > limits)
        return above.any(), above.to(torch.int8).argmax(), limits

    def rows(self) -> list[list[float]]:
        """The rows held, oldest first (a host read: for checkpoints)."""
        count, position = int(self.count), int(self.position)
        order = list(range(position, self.window)) + list(range(position)) if count == self.window else range(count)
        return [self.buffer[i].tolist() for i in order]


def growth_leader(values: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The index of the value largest relative to its own mean (0-dim long), as `SkipSpikes.spike_layer` picks it:
    a zero mean counts as infinite growth for a positive value, and a NaN ratio is never picked."""
    values, means = values.to(torch.float64), means.to(torch.float64)
    ratio = torch.where(
        means > 0,
        values / means.where(means > 0, torch.ones_like(means)),
        torch.where(values > 0, torch.full_like(values, math.inf), torch.zeros_like(values)),
    )
    return torch.nan_to_num(ratio, nan=-math.inf).argmax()
