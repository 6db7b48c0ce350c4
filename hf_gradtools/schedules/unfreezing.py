"""Gradual unfreezing: every N optimizer steps the highest still-frozen block trains again, the embeddings last.

`unfreeze_order` reads the plan from the frozen state that `freeze_embeddings` / `freeze_first_n_layers` set up;
`GradualUnfreezer` says which events are due at an optimizer step, applies them (the parameters get
`requires_grad=True` and join the live optimizer, with the learning rate and weight decay they would have had
from the start, LLRD included, and the scheduler drives them from then on), and saves and restores its position.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from hf_gradtools import freeze_embeddings, freeze_first_n_layers
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=3,
    ...     num_attention_heads=2, intermediate_size=32, vocab_size=100))
    >>> frozen = freeze_embeddings(model) + freeze_first_n_layers(model, 2)
    >>> [event.label for event in unfreeze_order(model, frozen)]
    ['layer.1', 'layer.0', 'embeddings']
    >>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    >>> unfreezer = GradualUnfreezer(unfreeze_order(model, frozen), every_n_steps=10, base_lr=1e-3)
    >>> [event.label for event in unfreezer.apply_due(20, model, optimizer)]
    ['layer.1', 'layer.0']
    >>> unfreezer.state_dict()["position"], len(optimizer.param_groups)
    (2, 3)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import LayerStackNotFoundError
from ..layout import EMBEDDINGS, block_label, find_input_embeddings, find_layer_stack
from ..settings import check_layerwise_lr_decay
from ..state_fields import FieldReader
from .live_groups import add_param_groups
from .lr_decay import _check_non_negative, param_groups_for


@dataclass(frozen=True)
class UnfreezeEvent:
    """One step of the plan: `label` (`layer.<i>` or `embeddings`) and the parameter names it unfreezes."""

    label: str
    parameter_names: tuple[str, ...]


def unfreeze_order(model: nn.Module, frozen: Iterable[str] | None = None) -> list[UnfreezeEvent]:
    """The unfreezing plan from the model's current frozen state: the highest frozen block first, embeddings last.

    Args:
        model: the model, with its frozen parameters at `requires_grad=False`.
        frozen: the names to unfreeze at the most: pass what `freeze_embeddings` and `freeze_first_n_layers`
            returned, so that parameters frozen by someone else (PEFT's base weights) stay frozen. `None`: every
            frozen parameter of the layer stack and the embeddings.

    Returns:
        One event per block of the layer stack that holds a frozen parameter (`layer.<block index>`, for ALBERT
        the shared block's index), from the output side down, then one for the embeddings (`embeddings`). Frozen
        parameters elsewhere (a frozen head, decoder blocks frozen by hand) are in no event and stay frozen.
    """
    allowed = None if frozen is None else set(frozen)
    names = {id(param): name for name, param in model.named_parameters()}

    def still_frozen(module: nn.Module, taken: set[str]) -> tuple[str, ...]:
        found = []
        for param in module.parameters():
            name = names[id(param)]
            if not param.requires_grad and (allowed is None or name in allowed) and name not in taken:
                found.append(name)
        return tuple(found)

    taken: set[str] = set()
    plan = []
    stack = find_layer_stack(model)
    for index in reversed(range(len(stack.blocks))):
        frozen_here = still_frozen(stack.blocks[index], taken)
        if frozen_here:
            plan.append(UnfreezeEvent(block_label(index), frozen_here))
            taken.update(frozen_here)
    try:
        embeddings = nn.ModuleList(module for _, module in find_input_embeddings(model))
    except LayerStackNotFoundError:
        embeddings = nn.ModuleList()
    frozen_here = still_frozen(embeddings, taken)
    if frozen_here:
        plan.append(UnfreezeEvent(EMBEDDINGS, frozen_here))
    return plan


class GradualUnfreezer:
    """Applies an unfreezing plan, one event every `every_n_steps` optimizer steps.

    Event `k` (0-based) is due at optimizer step `(k + 1) * every_n_steps`: call `apply_due(global_step, ...)`
    after each optimizer step and scheduler step (the Trainer's `on_step_end`), so the new parameters first train
    in the next step at the rate the schedule gives then. The settings are those of the optimizer's first groups,
    so the new groups match what they would have had from the start.

    Resume: the optimizer and scheduler are rebuilt from the initial frozen state, so before their state dicts
    are loaded call `load_state_dict(saved)` and then `replay(...)`, which applies the events already applied
    before the checkpoint, in the same order: the optimizer's groups then line up with the saved ones.

    Args:
        plan: from `unfreeze_order(model, frozen)`, taken in the initial frozen state.
        every_n_steps: optimizer steps between two events, 1 or more.
        base_lr: the Trainer's `learning_rate`.
        weight_decay: the Trainer's `weight_decay`.
        decay_parameter_names: what `Trainer.get_decay_parameter_names(model)` returns.
        layerwise_lr_decay: the LLRD factor used for the first groups, or `None`.
    """

    def __init__(
        self,
        plan: Sequence[UnfreezeEvent],
        every_n_steps: int,
        *,
        base_lr: float,
        weight_decay: float = 0.0,
        decay_parameter_names: Iterable[str] = (),
        layerwise_lr_decay: float | None = None,
    ):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`gradual_unfreeze_steps` must be a positive integer here, got {every_n_steps!r}.")
        self.plan = list(plan)
        self.every_n_steps = every_n_steps
        self.base_lr = _check_non_negative(base_lr, "base_lr")
        self.weight_decay = _check_non_negative(weight_decay, "weight_decay")
        self.decay_parameter_names = frozenset(decay_parameter_names)
        self.layerwise_lr_decay = None if layerwise_lr_decay is None else check_layerwise_lr_decay(layerwise_lr_decay)
        self.position = 0  # events applied to this process's model and optimizer
        self._to_replay: int | None = None

    def step_of(self, index: int) -> int:
        """The optimizer step at which event `index` is due."""
        return (index + 1) * self.every_n_steps

    def due(self, step: int) -> list[UnfreezeEvent]:
        """The events not applied yet that are due at or before optimizer step `step`; changes nothing."""
        return self.plan[self.position : min(step // self.every_n_steps, len(self.plan))]

    def _apply(self, events: list[UnfreezeEvent], model: nn.Module, optimizer, scheduler) -> list[UnfreezeEvent]:
        if not events:
            return events
        params = dict(model.named_parameters())
        for event in events:
            groups = param_groups_for(
                model,
                event.parameter_names,
                base_lr=self.base_lr,
                weight_decay=self.weight_decay,
                decay_parameter_names=self.decay_parameter_names,
                layerwise_lr_decay=self.layerwise_lr_decay,
            )
            add_param_groups(optimizer, groups, scheduler)  # refuses an unsupported scheduler before any change
            for name in event.parameter_names:
                params[name].requires_grad_(True)
            self.position += 1
        return events

    def apply_due(self, step: int, model: nn.Module, optimizer, scheduler=None) -> list[UnfreezeEvent]:
        """Unfreeze every event due at `step` and add its parameters to `optimizer` and `scheduler`.

        Returns the events applied now (usually none or one), for the logs.
        """
        if self._to_replay is not None:
            raise RuntimeError("Call `replay()` after `load_state_dict()`, before the next `apply_due()`.")
        return self._apply(self.due(step), model, optimizer, scheduler)

    def unfrozen_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters of the events applied so far: under DDP, those whose gradients DDP does not reduce."""
        params = dict(model.named_parameters())
        return [params[name] for event in self.plan[: self.position] for name in event.parameter_names]

    def state_dict(self) -> dict:
        """The position in the plan and what it was checked against, as plain Python values."""
        return {
            "position": self.position,
            "every_n_steps": self.every_n_steps,
            "labels": [event.label for event in self.plan],
        }

    @staticmethod
    def check_state(state) -> dict:
        """`state` as `state_dict()` writes it, or `StateFieldError` naming the field: an interval of 1 or more,
        the plan's labels, and a position from 0 to the number of events."""
        fields = FieldReader(
            state, "GradualUnfreezer state must be {'position': int, 'every_n_steps': int, 'labels': [str, ...]}"
        )
        every = fields.integer("every_n_steps", low=1)
        labels = fields.strings("labels")
        position = fields.integer("position", high=len(labels))
        fields.done()
        return {"position": position, "every_n_steps": every, "labels": labels}

    def load_state_dict(self, state: dict) -> None:
        """Take the position of a checkpoint (checked by `check_state`); `replay()` must follow. A different plan
        or interval is refused."""
        state = self.check_state(state)
        if state["every_n_steps"] != self.every_n_steps:
            raise ValueError(
                f"`gradual_unfreeze_steps`={self.every_n_steps} but the checkpoint was trained with "
                f"{state['every_n_steps']}. Resume with the same value."
            )
        labels = [event.label for event in self.plan]
        if state["labels"] != labels:
            raise ValueError(
                f"The unfreezing plan {labels} differs from the checkpoint's {state['labels']}: resume with "
                "the same `freeze_embeddings` and `freeze_first_n_layers`."
            )
        if self.position:
            raise RuntimeError("`load_state_dict()` needs a fresh GradualUnfreezer, before any event is applied.")
        self._to_replay = state["position"]

    def replay(self, model: nn.Module, optimizer, scheduler=None) -> list[UnfreezeEvent]:
        """Re-apply the events the checkpoint had applied, to a model and optimizer in the initial frozen state."""
        count, self._to_replay = self._to_replay or 0, None
        return self._apply(self.plan[:count], model, optimizer, scheduler)
