"""What the guard workers share: a tiny classifier trained under torchrun (2 processes, gloo) with a guard on, and
each rank's scheduler positions, logged skip counts, final step and weights saved for the test to compare.

`ddp_nonfinite.py` and `ddp_spike.py` each put a fault on rank 1 through their trainer class.
"""

from __future__ import annotations

import os

import torch
import transformers as T

from hf_gradtools import GradTrainer, GradTrainingArguments
from hf_gradtools.guards import SkipSpikes
from tests.conftest import classification_data, tiny_classifier


class SchedulerSteps(T.TrainerCallback):
    """The scheduler's position after every optimizer step, and as every step begins (after the last one's log)."""

    def __init__(self):
        self.positions, self.begun = [], []

    def on_step_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.begun.append(lr_scheduler.last_epoch)

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.positions.append(lr_scheduler.last_epoch)


def train_and_save(trainer_class: type[GradTrainer], prefix: str, count: str, rows: int, **fields) -> None:
    """Train with `fields` (the guard's and the run's length) on `rows` examples, batch 2 a process; save
    `{positions, begun, skips (the logged `count` at every step), global_step, spike_on_device, state}` to
    `prefix.<rank>.pt`."""
    settings = dict(
        output_dir=os.path.dirname(prefix),
        per_device_train_batch_size=2,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        ddp_backend="gloo",
        seed=0,
        logging_steps=1,
    )
    args = GradTrainingArguments(**{**settings, **fields})
    steps = SchedulerSteps()
    trainer = trainer_class(
        model=tiny_classifier(), args=args, train_dataset=classification_data(rows), callbacks=[steps]
    )
    trainer.train()
    result = {
        "positions": steps.positions,
        "begun": steps.begun,
        "skips": [h[count] for h in trainer.state.log_history if "loss" in h],
        "global_step": trainer.state.global_step,
        "spike_on_device": getattr(trainer.component(SkipSpikes), "_on_device", None),
        "state": {k: v.clone() for k, v in trainer.model.state_dict().items()},
    }
    torch.save(result, f"{prefix}.{args.process_index}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
