"""Worker for trainer/test_clipping_guards_monitoring_in_grad_trainer.py: under torchrun (2 processes, gloo), rank 1
alone gets a NaN gradient.

The NaN is written into `.grad` after the backward pass (so after DDP's all-reduce: only rank 1 sees it) and before
clipping, at optimizer step 2. Each rank saves its scheduler positions, logged skip counts and weights.

Usage: torchrun --nproc_per_node 2 ddp_nonfinite.py OUT_PREFIX
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402
import transformers as T  # noqa: E402

from hf_gradtools import GradTrainer, GradTrainingArguments  # noqa: E402
from tests.conftest import classification_data, exit_without_teardown, tiny_classifier  # noqa: E402

BAD_STEP = 2


class NanOnRankOne(GradTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.process_index == 1 and self.state.global_step + 1 == BAD_STEP:
            with torch.no_grad():
                self.model.classifier.weight.grad[0, 0] = math.nan
        return loss


class SchedulerSteps(T.TrainerCallback):
    def __init__(self):
        self.positions = []

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        self.positions.append(lr_scheduler.last_epoch)


def main(prefix: str) -> None:
    args = GradTrainingArguments(
        output_dir=os.path.dirname(prefix),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        skip_nonfinite_grads=True,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        ddp_backend="gloo",
        seed=0,
        logging_steps=1,
    )
    steps = SchedulerSteps()
    trainer = NanOnRankOne(
        model=tiny_classifier(), args=args, train_dataset=classification_data(16), callbacks=[steps]
    )
    trainer.train()
    skips = [h["nonfinite_skips"] for h in trainer.state.log_history if "loss" in h]
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    torch.save(
        {"positions": steps.positions, "skips": skips, "state": state, "global_step": trainer.state.global_step},
        f"{prefix}.{args.process_index}.pt",
    )
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_teardown()
