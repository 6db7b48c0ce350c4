"""Worker for tests/guards/test_spike_guard.py: under torchrun (2 processes, gloo), rank 1 alone gets a loss spike.

Rank 1's loss is multiplied by 1000 at optimizer step `SPIKE` (before backward, so after DDP's all-reduce both ranks
hold the spiked gradient, and the logged loss, averaged over the processes, spikes too). Each rank saves its
scheduler positions, logged skip counts and weights.

Usage: torchrun --nproc_per_node 2 ddp_spike.py OUT_PREFIX
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from hf_gradtools import GradTrainer, GradTrainingArguments  # noqa: E402
from tests.conftest import classification_data, exit_without_teardown, tiny_classifier  # noqa: E402
from tests.helpers.ddp_nonfinite import SchedulerSteps  # noqa: E402

SPIKE, STEPS = 8, 10


class SpikeOnRankOne(GradTrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training and self.args.process_index == 1 and self.state.global_step + 1 == SPIKE:
            return loss * 1000.0
        return loss


def main(prefix: str) -> None:
    args = GradTrainingArguments(
        output_dir=os.path.dirname(prefix),
        per_device_train_batch_size=2,
        max_steps=STEPS,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        skip_spike_steps=True,
        spike_min_history=5,
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
    trainer = SpikeOnRankOne(
        model=tiny_classifier(), args=args, train_dataset=classification_data(40), callbacks=[steps]
    )
    trainer.train()
    skips = [h["spike_skips"] for h in trainer.state.log_history if "loss" in h]
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"positions": steps.positions, "skips": skips, "state": state}, f"{prefix}.{args.process_index}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_teardown()
