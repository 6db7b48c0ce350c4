"""Worker for trainer/test_clipping_guards_monitoring_in_grad_trainer.py: under torchrun (2 processes, gloo), rank 1
alone gets a NaN gradient.

The NaN is written into `.grad` after the backward pass (so after DDP's all-reduce: only rank 1 sees it) and before
clipping, at optimizer step 2. Each rank saves what `ddp_guard.train_and_save` saves.

Usage: torchrun --nproc_per_node 2 ddp_nonfinite.py OUT_PREFIX
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from hf_gradtools import GradTrainer  # noqa: E402
from tests.conftest import exit_without_teardown  # noqa: E402
from tests.helpers.ddp_guard import train_and_save  # noqa: E402

BAD_STEP = 2


class NanOnRankOne(GradTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.process_index == 1 and self.state.global_step + 1 == BAD_STEP:
            with torch.no_grad():
                self.model.classifier.weight.grad[0, 0] = math.nan
        return loss


if __name__ == "__main__":
    train_and_save(
        NanOnRankOne, sys.argv[1], "nonfinite_skips", 16, max_steps=4, learning_rate=1e-2, skip_nonfinite_grads=True
    )
    exit_without_teardown()
