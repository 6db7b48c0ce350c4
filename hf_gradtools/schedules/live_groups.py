"""Add parameter groups to a live optimizer so that its learning-rate scheduler keeps driving them.

`torch.optim.Optimizer.add_param_group` alone leaves the scheduler unaware of the new group: a `LambdaLR` keeps one
`base_lr` and one factor function per group and its next `step()` fails on the length mismatch. `add_param_groups`
registers each new group with the scheduler: its base rate becomes the group's `initial_lr` and `base_lrs` entry,
it takes the factor function of an existing group (every transformers schedule uses one function for all
groups), and it starts at `base_lr * factor(current step)`, the rate the other groups are at now, so every
group keeps its ratio to the others from then on. The optimizer state of the new parameters starts empty.

Supported schedulers: `torch.optim.lr_scheduler.LambdaLR`, which every `lr_scheduler_type` of transformers builds
except `reduce_lr_on_plateau` and `greedy`; accelerate's wrappers of optimizer and scheduler are looked through.

Example:
    >>> import torch
    >>> from transformers import get_linear_schedule_with_warmup
    >>> old, new = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> optimizer = torch.optim.SGD(old.parameters(), lr=0.1)
    >>> scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=10)
    >>> for _ in range(5):
    ...     optimizer.step(); scheduler.step()
    >>> add_param_groups(optimizer, [{"params": list(new.parameters()), "lr": 0.02}], scheduler)
    >>> [round(group["lr"], 6) for group in optimizer.param_groups]
    [0.05, 0.01]
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


def _inner_optimizer(optimizer) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer holds the real one in `.optimizer`.
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _inner_scheduler(scheduler):
    # accelerate's AcceleratedScheduler holds the real one in `.scheduler`.
    while getattr(scheduler, "scheduler", None) is not None:
        scheduler = scheduler.scheduler
    return scheduler


def add_param_groups(optimizer, groups: Iterable[dict], scheduler=None, like_group: int = 0) -> None:
    """Add `groups` to a live `optimizer` and register them with its `scheduler`; see the module docstring.

    Args:
        optimizer: a torch optimizer (or accelerate's wrapper of one) that has already stepped or not.
        groups: parameter groups, each with `"params"` and its base `"lr"` (the rate before any schedule factor,
            e.g. from `lr_decay.param_groups_for`); a group without `"lr"` gets the optimizer's default.
        scheduler: the `LambdaLR` that drives `optimizer`, or `None` (the groups then train at their base rate).
        like_group: the index of the existing group whose factor function the new groups take.

    Raises:
        ValueError: the scheduler is of an unsupported kind or drives another optimizer, or `like_group` does not
            exist.
    """
    inner = _inner_optimizer(optimizer)
    lambda_lr = None
    if scheduler is not None:
        lambda_lr = _inner_scheduler(scheduler)
        if not isinstance(lambda_lr, LambdaLR):
            raise ValueError(
                f"Cannot add parameter groups under a {type(lambda_lr).__name__} learning-rate scheduler: only a "
                "LambdaLR (every `lr_scheduler_type` but 'reduce_lr_on_plateau' and 'greedy') can take new groups."
            )
        if _inner_optimizer(lambda_lr.optimizer) is not inner:
            raise ValueError("The `scheduler` given drives another optimizer than the `optimizer` given.")
        if not -len(lambda_lr.lr_lambdas) <= like_group < len(lambda_lr.lr_lambdas):
            raise ValueError(f"`like_group`={like_group} but the scheduler has {len(lambda_lr.lr_lambdas)} group(s).")
    for group in groups:
        group = dict(group)
        base_lr = group.get("lr", inner.defaults["lr"])
        group["initial_lr"] = base_lr
        if lambda_lr is None:
            group["lr"] = base_lr
            optimizer.add_param_group(group)
            continue
        factor = lambda_lr.lr_lambdas[like_group]
        group["lr"] = base_lr * factor(lambda_lr.last_epoch)
        optimizer.add_param_group(group)
        lambda_lr.lr_lambdas.append(factor)
        lambda_lr.base_lrs.append(base_lr)
        if hasattr(lambda_lr, "_last_lr"):
            lambda_lr._last_lr.append(group["lr"])
