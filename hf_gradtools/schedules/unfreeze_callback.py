"""`GradualUnfreezeCallback`: applies a `GradualUnfreezer` inside a Trainer run, logs each event and records it.

At the end of every optimizer step (after the optimizer and the scheduler stepped) the due events are applied to
the model and the live optimizer. Each event

- writes one INFO line of the `hf_gradtools` logger (`step 4: unfroze layer.1 (16 tensors, 12,345 elements)`);
- asks the Trainer to log at this step, where `GradTrainer` adds the numeric `unfrozen_blocks` (events applied so
  far) to the logs, so every `report_to` backend gets a number, never a string;
- rewrites `frozen_parameters.json` (main process only, atomically) with the frozen state now and a `history`:
  `[{"step": 4, "unfrozen": "layer.1", "parameters": [...]}, ...]`.

The unfreezer is handed in by the trainer (`GradTrainerMixin` builds it with the optimizer, so that it exists
before a checkpoint's position is replayed); the callback holds no other state. It works on a plain `Trainer` too:

    >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    >>> from hf_gradtools import freeze_embeddings, freeze_first_n_layers
    >>> from hf_gradtools.schedules import GradualUnfreezer, unfreeze_order
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=3,
    ...     num_attention_heads=2, intermediate_size=32, vocab_size=100))
    >>> frozen = freeze_embeddings(model) + freeze_first_n_layers(model, 2)
    >>> args = TrainingArguments("out", report_to="none")
    >>> unfreezer = GradualUnfreezer(unfreeze_order(model, frozen), 100, base_lr=args.learning_rate)
    >>> trainer = Trainer(model, args, callbacks=[GradualUnfreezeCallback(unfreezer)])  # then trainer.train(...)
"""

from __future__ import annotations

import logging
import os

from torch import nn
from transformers import TrainerCallback

from ..atomic import write_json_atomic
from ..components import TrainerComponent
from ..distributed import all_reduce_grads_
from ..freezing import frozen_by_settings
from ..snapshots import FROZEN_PARAMETERS_FILE, describe_parameters
from .live_groups import _inner_scheduler
from .unfreezing import GradualUnfreezer, unfreeze_order

logger = logging.getLogger(__name__)


def unfreeze_history(unfreezer: GradualUnfreezer) -> list[dict]:
    """The events applied so far, each `{"step", "unfrozen", "parameters"}`, in the order they were applied."""
    return [
        {"step": unfreezer.step_of(index), "unfrozen": event.label, "parameters": list(event.parameter_names)}
        for index, event in enumerate(unfreezer.plan[: unfreezer.position])
    ]


def write_frozen_record(output_dir: str, model: nn.Module, unfreezer: GradualUnfreezer) -> None:
    """Write `frozen_parameters.json`: the frozen state of `model` now, the plan and the events applied so far."""
    record = describe_parameters(model)
    record["unfreeze_plan"] = [event.label for event in unfreezer.plan]
    record["unfreeze_every_n_steps"] = unfreezer.every_n_steps
    record["history"] = unfreeze_history(unfreezer)
    write_json_atomic(os.path.join(output_dir, FROZEN_PARAMETERS_FILE), record)


class GradualUnfreezeCallback(TrainerCallback):
    """Applies `unfreezer`'s due events at the end of each optimizer step; see the module docstring.

    Args:
        unfreezer: the plan and position; `GradTrainerMixin` replaces it at each `train()` call.
    """

    def __init__(self, unfreezer: GradualUnfreezer | None = None):
        self.unfreezer = unfreezer

    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        if self.unfreezer is None or model is None:
            return
        scheduler = None if lr_scheduler is None else _inner_scheduler(lr_scheduler)
        if scheduler is not None and not hasattr(scheduler, "lr_lambdas"):
            raise ValueError(
                f"`gradual_unfreeze_steps` cannot add parameters under a {type(scheduler).__name__} learning-rate"
                " scheduler: only a LambdaLR (every `lr_scheduler_type` but 'reduce_lr_on_plateau' and "
                "'greedy') can take new groups."
            )
        if state.is_world_process_zero:
            # After the snapshot callback's record (it is attached first): the same file, with the history.
            write_frozen_record(args.output_dir, model, self.unfreezer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self.unfreezer is None or model is None:
            return
        events = self.unfreezer.apply_due(state.global_step, model, optimizer, lr_scheduler)
        if not events:
            return
        params = dict(model.named_parameters())
        for event in events:
            elements = sum(params[name].numel() for name in event.parameter_names)
            logger.info(
                "hf_gradtools: step %d: unfroze %s (%d tensors, %s elements); %d of %d blocks unfrozen",
                state.global_step,
                event.label,
                len(event.parameter_names),
                f"{elements:,}",
                self.unfreezer.position,
                len(self.unfreezer.plan),
            )
        control.should_log = True
        if state.is_world_process_zero:
            write_frozen_record(args.output_dir, model, self.unfreezer)


class GradualUnfreezing(TrainerComponent):
    """`gradual_unfreeze_steps` in a `GradTrainer` run, or a `GradualUnfreezeCallback` of your own with its
    unfreezer: the position is checkpointed (and replayed on resume, so the optimizer state loads into the right
    groups), `unfrozen_blocks` is logged, and under DDP the gradients of blocks unfrozen after wrapping are
    averaged at each window's end (DDP does not reduce them)."""

    name = "unfreezer"
    check_state = staticmethod(GradualUnfreezer.check_state)

    def __init__(self, settings=None, callback: GradualUnfreezeCallback | None = None):
        self.settings = settings
        self.callback = callback  # a user's own, with its unfreezer; else one attached in `on_train_begin`

    @classmethod
    def from_args(cls, settings, model) -> GradualUnfreezing | None:
        return cls(settings) if settings.gradual_unfreeze_steps else None

    @property
    def unfreezer(self) -> GradualUnfreezer | None:
        return self.callback.unfreezer if self.callback is not None else None

    def on_train_begin(self, trainer) -> None:
        if self.settings is None:
            return  # a user's own callback and unfreezer
        model, settings, every = trainer.model, self.settings, self.settings.gradual_unfreeze_steps
        plan = unfreeze_order(model, trainer._frozen_by_args or frozen_by_settings(model, settings))
        if not plan:
            raise ValueError(
                f"`gradual_unfreeze_steps`={every} but {type(model).__name__} has no block frozen by "
                "`freeze_embeddings` / `freeze_first_n_layers`: there is nothing to unfreeze."
            )
        unfreezer = GradualUnfreezer(
            plan,
            every,
            base_lr=trainer.args.learning_rate,
            weight_decay=trainer.args.weight_decay,
            decay_parameter_names=trainer.get_decay_parameter_names(model),
            layerwise_lr_decay=settings.layerwise_lr_decay,
        )
        if self.callback is None:
            self.callback = GradualUnfreezeCallback()
            trainer.add_callback(self.callback)
        self.callback.unfreezer = unfreezer

    def on_window_end(self, trainer) -> None:
        if self.unfreezer is not None and trainer.accelerator.num_processes > 1:
            all_reduce_grads_(self.unfreezer.unfrozen_parameters(trainer.model))

    def log_entries(self, trainer) -> dict[str, float]:
        return {"unfrozen_blocks": self.unfreezer.position} if self.unfreezer is not None else {}

    def state_dict(self):
        return self.unfreezer.state_dict() if self.unfreezer is not None else None

    def load_state_dict(self, state, trainer) -> None:
        if self.unfreezer is None:
            return
        if state is None:
            checkpoint = getattr(trainer, "resumed_checkpoint", None) or "being resumed"
            raise ValueError(
                f"`gradual_unfreeze_steps`={self.unfreezer.every_n_steps} but the checkpoint {checkpoint} holds no "
                "unfreezing position (it was trained without gradual unfreezing). Resume with the settings it was "
                "trained with."
            )
        self.unfreezer.load_state_dict(state)
        self.unfreezer.replay(trainer.model, trainer.optimizer, trainer.lr_scheduler)
