"""The one mechanism by which a guard skips an optimizer step: no parameter, optimizer-state or scheduler change.

A guard decides; `StepSkipper.skip` then zeroes the step's gradients and makes the optimizer's next `step()` a
no-op that accelerate reports as skipped (`optimizer_step_was_skipped`), so the Trainer leaves the scheduler
alone; `global_step` still counts the step. With fp16's grad scaler the step is handed to the scaler as an
overflow: it skips the update and lowers the scale, as for any overflow.

Example:
    >>> import torch
    >>> from accelerate import Accelerator
    >>> from accelerate.optimizer import AcceleratedOptimizer
    >>> _ = Accelerator(cpu=True)
    >>> layer = torch.nn.Linear(2, 1)
    >>> optimizer = AcceleratedOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), device_placement=False)
    >>> layer.weight.grad, layer.bias.grad = torch.ones(1, 2), torch.ones(1)
    >>> before = layer.weight.detach().clone()
    >>> skipper = StepSkipper()
    >>> skipper.skip(list(layer.parameters()), optimizer)
    >>> optimizer.step()
    >>> torch.equal(layer.weight, before), optimizer.step_was_skipped
    (True, True)
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import is_sharded, local_tensor


def skip_optimizer_step(optimizer) -> None:
    """Make the next `optimizer.step()` of an accelerate `AcceleratedOptimizer` skip the update and say so.

    The Trainer then leaves the scheduler alone (`accelerator.optimizer_step_was_skipped`), as it does for a step
    that fp16's grad scaler skips. With a grad scaler, the step is handed to it marked as overflowed: it skips the
    update and lowers the scale, as for any overflow. Without one, `step` is a no-op once, then the class's own.
    """
    scaler = getattr(optimizer, "scaler", None)
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(getattr(optimizer, "optimizer", None)), {})
    if scaler is not None and state.get("found_inf_per_device"):
        for found_inf in state["found_inf_per_device"].values():
            found_inf.fill_(1.0)  # the scaler then skips the step and backs off, on every process alike
        return
    previous = optimizer.__dict__.get("step")

    def skipped_step(*args, **kwargs):
        if previous is None:
            del optimizer.step
        else:
            optimizer.step = previous
        optimizer._is_overflow = True
        if scaler is not None:  # keep the scaler's bookkeeping consistent: its scale backs off
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())

    optimizer.step = skipped_step


class StepSkipper:
    """Skips optimizer steps for every guard of a run, and clears the skip mark once the next step begins."""

    def __init__(self):
        self._marked = None

    def begin_step(self) -> None:
        """Before a step's guards decide: the last step's skip mark is cleared (this step is not skipped, unless
        found so)."""
        if self._marked is not None:
            self._marked._is_overflow = False
            self._marked = None

    def skip(self, params: list[nn.Parameter], optimizer) -> None:
        """Zero the gradients of `params` and make `optimizer`'s next step a no-op reported as skipped."""
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_zero_(local_tensor(grads) if is_sharded(grads) else grads)
        skip_optimizer_step(optimizer)
        self._marked = optimizer
