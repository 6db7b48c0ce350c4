"""The one mechanism by which a guard skips an optimizer step: no parameter, optimizer-state or scheduler change.

A guard decides; `StepSkipper.skip` then zeroes the step's gradients and makes the optimizer's next `step()` a
no-op that accelerate reports as skipped (`optimizer_step_was_skipped`), so the Trainer leaves the scheduler
alone; `global_step` still counts the step. With fp16's grad scaler the step is handed to the scaler as an
overflow: it skips the update and lowers the scale, as for any overflow.

A decision that stays on the device (a 0-dim bool tensor) goes to `StepSkipper.skip_on_device` instead: it is
handed to a fused torch optimizer as its `found_inf` flag (the flag fp16's grad scaler uses), whose kernel then
leaves every parameter and state tensor as it was, step counts included, with no host read. The scheduler cannot
see such a decision: `hold_scheduler` sets it back once the host has read how many steps were skipped.

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


def device_skip_blocker(optimizer, scheduler) -> str | None:
    """Why a step cannot be skipped on the device with this optimizer and scheduler (`None`: it can).

    It needs a fused torch optimizer (`optim="adamw_torch_fused"`, the Trainer's default with torch >= 2.8: one that
    takes a `found_inf` flag) over unsharded parameters, no grad scaler (fp16's sets that flag itself), and a
    `LambdaLR` scheduler (every schedule of `transformers.get_scheduler` but `reduce_lr_on_plateau` and `greedy`),
    whose position can be set back.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    if not getattr(inner, "_step_supports_amp_scaling", False):
        return (
            f"the optimizer ({type(inner).__name__}) is not a fused one that takes a skip flag; "
            "`optim='adamw_torch_fused'` is"
        )
    if getattr(optimizer, "scaler", None) is not None:
        return "fp16's grad scaler sets the optimizer's skip flag itself"
    if is_sharded(p for group in inner.param_groups for p in group["params"]):
        return "the parameters are sharded (FSDP2), and the skip flag is not a DTensor"
    schedule = getattr(scheduler, "scheduler", scheduler)
    if not isinstance(schedule, torch.optim.lr_scheduler.LambdaLR):
        return f"the scheduler ({type(schedule).__name__}) is not a LambdaLR, whose position can be set back"
    return None


def has_fresh_state(optimizer, params) -> bool:
    """Whether a parameter of `params` has no optimizer state yet: its first step creates it, and a fused kernel
    skipped on its flag may leave it unset (SGD's momentum buffer is made with `empty_like`), so that step's
    decision is read on the host."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return any(p not in inner.state for p in params)


def device_decision(component, decision: torch.Tensor) -> torch.Tensor:
    """A component's decision kept on the device, as a 0-dim bool tensor; any other shape is refused, naming it."""
    if decision.ndim != 0:
        raise TypeError(
            f"{type(component).__name__}.should_skip returned a tensor of shape {tuple(decision.shape)}; return a "
            "bool, or a 0-dim bool tensor to keep the decision on the device."
        )
    return decision.to(torch.bool)


def hold_scheduler(scheduler, steps: int) -> None:
    """Set a `LambdaLR` back by `steps` positions (steps skipped on the device, which it stepped past): its
    position, its last rates and the optimizer's rates become what holding it at each of them would have left."""
    schedule = getattr(scheduler, "scheduler", scheduler)
    if steps <= 0:
        return
    schedule.last_epoch -= steps
    position = schedule.last_epoch
    rates = [base * rule(position) for base, rule in zip(schedule.base_lrs, schedule.lr_lambdas, strict=True)]
    for group, rate in zip(schedule.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    schedule._last_lr = rates


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
        self._flagged = None

    def begin_step(self) -> None:
        """Before a step's guards decide: the last step's skip mark is cleared (this step is not skipped, unless
        found so)."""
        if self._marked is not None:
            self._marked._is_overflow = False
            self._marked = None
        self.clear_device_flag()

    def clear_device_flag(self) -> None:
        """Take back the `found_inf` flag `skip_on_device` handed the optimizer (after its step, or at the end)."""
        if self._flagged is not None:
            self._flagged.found_inf = None
            self._flagged = None

    def skip_on_device(self, optimizer, skip: torch.Tensor) -> None:
        """Make `optimizer`'s next step leave everything as it was where `skip` (a 0-dim bool tensor) is true, with
        no host read: the fused step's `found_inf` flag (see `device_skip_blocker` for what it needs)."""
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.found_inf = skip.to(torch.float32)
        inner.grad_scale = None
        self._flagged = inner

    def skip(self, params: list[nn.Parameter], optimizer) -> None:
        """Zero the gradients of `params` and make `optimizer`'s next step a no-op reported as skipped."""
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_zero_(local_tensor(grads) if is_sharded(grads) else grads)
        skip_optimizer_step(optimizer)
        self._marked = optimizer
