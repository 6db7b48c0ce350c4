"""Worker for tests/guards/test_spike_guard.py: under torchrun (2 processes, gloo), rank 1 alone gets a loss spike.

Rank 1's loss is multiplied by 1000 at optimizer step `SPIKE` (before backward, so after DDP's all-reduce both ranks
hold the spiked gradient, and the logged loss, averaged over the processes, spikes too). Each rank saves what
`ddp_guard.train_and_save` saves.

With `device` after the prefix, the guard decides on the device (`SkipSpikes.decide_on_device`, the fused AdamW):
the flag is all-reduced as a tensor and never read until the log.

Usage: torchrun --nproc_per_node 2 ddp_spike.py OUT_PREFIX [device]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from hf_gradtools import GradTrainer  # noqa: E402
from hf_gradtools.guards import SkipSpikes  # noqa: E402
from tests.conftest import exit_without_teardown  # noqa: E402
from tests.helpers.ddp_guard import train_and_save  # noqa: E402

SPIKE, STEPS = 8, 10


class SpikeOnRankOne(GradTrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        if model.training and self.args.process_index == 1 and self.state.global_step + 1 == SPIKE:
            return loss * 1000.0
        return loss


if __name__ == "__main__":
    on_device = sys.argv[2:] == ["device"]
    SkipSpikes.decide_on_device = on_device
    train_and_save(
        SpikeOnRankOne,
        sys.argv[1],
        "spike_skips",
        40,
        max_steps=STEPS,
        learning_rate=1e-3,
        skip_spike_steps=True,
        spike_min_history=5,
        optim="adamw_torch_fused" if on_device else "adamw_torch",
    )
    exit_without_teardown()
