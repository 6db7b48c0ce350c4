"""`TrainerComponent`: one run-time tool of `GradTrainer`, called at fixed points of the training step.

Every tool that acts while training runs is a component: the clip algorithm, the guards, the per-layer norms, the
noise meter, the unfreezer, the snapshot feed, and any of your own. `GradTrainer` builds its components at each
`train()` call (`from_args(settings, model)`, `None` when the settings leave it off), and loops over them:

| hook | when |
|---|---|
| `on_train_begin(trainer)` | the optimizer is built, no checkpoint loaded yet |
| `before_micro_batch(trainer, inputs)` / `after_micro_batch(trainer, inputs, loss)` | around each micro-batch's forward and backward |
| `micro_batch(trainer, inputs)` | a context manager around that forward and backward (left even when it raises) |
| `on_window_end(trainer)` | after a window's last backward, before clipping |
| `before_clip(trainer, step)` | the gradients as the window left them (`step.params`) |
| `should_skip(trainer, step)` | after clipping (`step.result`): `True`, or a 0-dim bool tensor kept on the device, skips the optimizer step (`guards.StepSkipper`) |
| `after_clip(trainer, step)` | after the decision (`step.skipped`) |
| `on_step_end(trainer)` | after the optimizer and scheduler stepped (`trainer.state.global_step` counts it) |
| `read_back(trainer)` | at a training log, a checkpoint and the end: bring decisions kept on the device to the host |
| `log_entries(trainer)` | a training log: what it adds |
| `state_dict()` / `load_state_dict(state, trainer)` | the checkpoint's `hf_gradtools_state.json`, under `name` |

A component of your own joins the built-ins with `trainer.add_component`:

    >>> class CountSteps(TrainerComponent):
    ...     name = "count_steps"  # its entry in the checkpoint's state file
    ...     def __init__(self):
    ...         self.steps = 0
    ...     def after_clip(self, trainer, step):
    ...         self.steps += 1
    ...     def log_entries(self, trainer):
    ...         return {"steps_seen": self.steps}
    ...     def state_dict(self):
    ...         return {"steps": self.steps}
    ...     def load_state_dict(self, state, trainer):
    ...         self.steps = int(state["steps"])
    >>> component = CountSteps()
    >>> component.after_clip(None, None); component.log_entries(None)
    {'steps_seen': 1}
    >>> trainer.add_component(component)  # doctest: +SKIP

A component that overrides a hook between backward and the optimizer step (`before_clip`, `should_skip`,
`after_clip`), or sets `every_step = True`, makes each optimizer step take `GradTrainer`'s own clipping path.
"""  # noqa: E501

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ClipStep:
    """One optimizer step, as the components see it.

    Attributes:
        step: the `global_step` this optimizer step produces.
        params: the parameters with a gradient, in `model.parameters()` order.
        names: their names in the model.
        result: the clipping's `ClipResult` (norms before clipping, total norm after), once clipped.
        skipped: whether a guard skipped the step (known in `after_clip`): a bool, or a 0-dim bool tensor when the
            decision stayed on the device.
    """

    step: int
    params: list[nn.Parameter]
    names: list[str]
    result: Any = None
    skipped: bool | torch.Tensor = False
    extras: dict = field(default_factory=dict)  # what one component hands another within the step


class TrainerComponent:
    """A run-time tool of `GradTrainer`; override the hooks it needs (each does nothing by default)."""

    name: str = ""  # its entry in the checkpoint's state file; empty: it keeps none
    every_step: bool = False  # whether it needs `GradTrainer`'s own clipping path at every optimizer step

    @classmethod
    def from_args(cls, settings, model: nn.Module | None) -> TrainerComponent | None:
        """The component for a run (`settings`: its `GradSettings`), or `None` when the settings leave it off."""
        return cls()

    @staticmethod
    def check_state(state: Any) -> Any:
        """Check the entry a checkpoint holds for it (untrusted input); raise `ValueError` naming the field."""
        return state

    def on_train_begin(self, trainer) -> None:
        """The optimizer is built and no checkpoint is loaded yet."""

    def before_micro_batch(self, trainer, inputs: dict) -> None:
        """Before a training micro-batch's forward."""

    def after_micro_batch(self, trainer, inputs: dict, loss: torch.Tensor) -> None:
        """After its backward; `loss` as `training_step` returns it."""

    def micro_batch(self, trainer, inputs: dict) -> contextlib.AbstractContextManager:
        """A context entered around the micro-batch's forward and backward (e.g. to change the model for it)."""
        return contextlib.nullcontext()

    def on_window_end(self, trainer) -> None:
        """After the window's last backward, before clipping."""

    def before_clip(self, trainer, step: ClipStep) -> None:
        """The accumulated gradients, before value clipping and the clip algorithm."""

    def should_skip(self, trainer, step: ClipStep) -> bool | torch.Tensor:
        """Whether this optimizer step must not be applied (a guard); every component is asked. A 0-dim bool tensor
        keeps the decision on the device (see `guards.skip`)."""
        return False

    def after_clip(self, trainer, step: ClipStep) -> None:
        """After clipping and the guards' decision."""

    def on_step_end(self, trainer) -> None:
        """After the optimizer and scheduler stepped."""

    def read_back(self, trainer) -> None:
        """Read what was kept on the device since the last read (before a log's entries and a checkpoint's save)."""

    def log_entries(self, trainer) -> dict[str, float]:
        """What a training log gains (plain numbers)."""
        return {}

    def state_dict(self) -> Any:
        """What a checkpoint keeps under `name` (plain JSON values), or `None`: nothing."""
        return None

    def load_state_dict(self, state: Any, trainer) -> None:
        """Restore what `state_dict` returned (checked by `check_state`)."""


STEP_HOOKS = ("before_clip", "should_skip", "after_clip")


def acts_every_step(component: TrainerComponent) -> bool:
    """Whether `component` needs the trainer's own clipping path at each optimizer step: `every_step`, or a hook
    between backward and the optimizer step (`before_clip`, `should_skip`, `after_clip`) overridden."""
    cls = type(component)
    return component.every_step or any(getattr(cls, h) is not getattr(TrainerComponent, h) for h in STEP_HOOKS)


class ParameterNames:
    """The names of parameters in a model: a map built once, rebuilt when a parameter is new to it."""

    def __init__(self):
        self._names: dict[int, str] = {}

    def __call__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
        if any(id(p) not in self._names for p in params):
            self._names = {id(p): name for name, p in model.named_parameters()}
        return [self._names[id(p)] for p in params]


def warn_starts_afresh(trainer, what: str) -> None:
    """One warning: the checkpoint being resumed holds no state for `what`, which starts afresh."""
    checkpoint = getattr(trainer, "resumed_checkpoint", None) or "the checkpoint"
    logging.getLogger("hf_gradtools").warning(
        "%s holds no %s state: it starts afresh in the resumed run.", checkpoint, what
    )
