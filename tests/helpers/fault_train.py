"""Train a tiny BERT classifier with GradTrainer (a snapshot every step, a checkpoint every 2), and hang on purpose
so that the test can SIGKILL the process at a known moment. WHERE is one of:

- `writes`: at step 6, in the middle of two writes at once: the background snapshot writer hangs half-way through
  the temporary file of `step-00000006.json`, and the checkpoint save of step 6 hangs after the model, optimizer
  and scheduler are written, before the RNG states and `trainer_state.json`;
- `step`: in the middle of step 7, after the encoder's forward pass and before the classifier's.

Each hang first creates a file in SIGNAL_DIR (`snapshot`, `save`, `step`). `make_trainer` is also imported by the
test, to resume the killed run and to train an uninterrupted reference with the same settings.

Usage: python fault_train.py OUTPUT_DIR SIGNAL_DIR WHERE
"""

from __future__ import annotations

import builtins
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from conftest import classification_data, grad_args, tiny_classifier  # noqa: E402

from hf_gradtools import GradTrainer, atomic  # noqa: E402

MAX_STEPS = 8
HANG_STEP = 6


def make_trainer(output_dir: str, trainer_class: type = GradTrainer) -> GradTrainer:
    args = grad_args(
        Path(output_dir).parent,
        output_dir=output_dir,
        per_device_train_batch_size=2,
        max_steps=MAX_STEPS,
        max_grad_norm=0.5,
        clip_norm_type=1.0,
        grad_snapshot_steps=1,
        save_strategy="steps",
        save_steps=2,
        freeze_embeddings=True,
    )
    return trainer_class(model=tiny_classifier(), args=args, train_dataset=classification_data(2 * MAX_STEPS))


def hang(signal_dir: str, what: str) -> None:
    with builtins.open(os.path.join(signal_dir, what), "w"):
        pass
    time.sleep(600)  # until the test kills us


class HalfWrittenFile:
    """An open file that writes half of what it is given, makes it durable, then hangs."""

    def __init__(self, file, signal_dir: str):
        self.file, self.signal_dir = file, signal_dir

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, text: str) -> int:
        self.file.write(text[: len(text) // 2])
        self.file.flush()
        os.fsync(self.file.fileno())
        hang(self.signal_dir, "snapshot")
        return len(text)


def main(output_dir: str, signal_dir: str, where: str) -> None:
    hang_name = f"step-{HANG_STEP:08d}.json"

    def open_that_hangs(path, *args, **kwargs):
        file = builtins.open(path, *args, **kwargs)
        return HalfWrittenFile(file, signal_dir) if hang_name in os.fspath(path) else file

    class HangingTrainer(GradTrainer):
        def _save_rng_state(self, output_dir):
            if where == "writes" and self.state.global_step == HANG_STEP:
                hang(signal_dir, "save")
            super()._save_rng_state(output_dir)

    trainer = make_trainer(output_dir, HangingTrainer)
    if where == "writes":
        atomic.open = open_that_hangs  # module global: shadows the builtin inside hf_gradtools.atomic only
    else:

        def hang_in_step(module, inputs):
            if trainer.state.global_step == HANG_STEP:  # step 7 is running
                hang(signal_dir, "step")

        trainer.model.classifier.register_forward_pre_hook(hang_in_step)
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
