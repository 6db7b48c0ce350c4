"""Train a tiny BERT classifier with GradTrainer (a snapshot every step, a checkpoint every 2), in a process that the
test then kills or stops. `main(OUTPUT_DIR, SIGNAL_DIR, WHERE)` hangs on purpose at a known moment, first creating
a file in SIGNAL_DIR (`snapshot`, `save`, `step`, `term`). WHERE is one of:

- `snapshot`: the background snapshot writer hangs half-way through the temporary file of `step-00000006.json`
  (and the checkpoint save of step 6 waits for it);
- `save`: the checkpoint save of step 6 hangs after the model, optimizer and scheduler are written, before the RNG
  states and `trainer_state.json`;
- `step`: in the middle of step 7, after the encoder's forward pass and before the classifier's;
- `term`: with gradient tensors every step and no checkpoint (`TERM_SETTINGS`) on a slow disk (each snapshot's
  JSON takes `SLOW_WRITE` seconds), after step 5, with the snapshots of the last steps still queued: the test
  sends SIGTERM.

`train_and_report(OUTPUT_DIR, SIGNAL_DIR, connection)` trains with `KILL_SETTINGS`, sends each finished step's
number down `connection`, then `"done"` once `train()` has returned, and waits to be killed.

The test starts these in processes forked from a server that has imported torch and transformers once (each
interpreter start costs seconds). `make_trainer` is also imported by the test, to resume the killed runs and to
train uninterrupted references with the same settings. An error in a process is written to SIGNAL_DIR/`error`.

Usage: python fault_train.py OUTPUT_DIR SIGNAL_DIR WHERE
"""

from __future__ import annotations

import builtins
import functools
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from transformers import TrainerCallback  # noqa: E402

from hf_gradtools import GradTrainer, atomic  # noqa: E402
from tests.conftest import classification_data, grad_args, tiny_classifier  # noqa: E402

MAX_STEPS = 8
# The epoch has batches left after the last step, as in most runs that `max_steps` ends.
ROWS = 2 * MAX_STEPS + 4
HANG_STEP = 6
TERM_STEP = 5
SLOW_WRITE = 0.5
TENSOR_SETTINGS = {"grad_snapshot_tensors": [r"^classifier\.", r"layer\.2\.output\.dense\.weight$"]}
TERM_SETTINGS = {**TENSOR_SETTINGS, "save_strategy": "no"}  # no checkpoint waits for the writer: a queue builds
KILL_SETTINGS = {**TENSOR_SETTINGS, "grad_snapshot_total_limit": 3}


def make_trainer(output_dir: str, trainer_class: type = GradTrainer, **settings) -> GradTrainer:
    args = grad_args(
        Path(output_dir).parent,
        **{
            "output_dir": output_dir,
            "per_device_train_batch_size": 2,
            "max_steps": MAX_STEPS,
            "max_grad_norm": 0.5,
            "clip_norm_type": 1.0,
            "grad_snapshot_steps": 1,
            "save_strategy": "steps",
            "save_steps": 2,
            "freeze_embeddings": True,
            **settings,
        },
    )
    return trainer_class(model=tiny_classifier(), args=args, train_dataset=classification_data(ROWS))


def reporting_errors(target):
    """Run `target(output_dir, signal_dir, ...)`, writing the traceback of an error to `signal_dir/error`."""

    @functools.wraps(target)
    def run(output_dir: str, signal_dir: str, *args):
        try:
            target(output_dir, signal_dir, *args)
        except Exception:
            with builtins.open(os.path.join(signal_dir, "error"), "w") as f:
                f.write(traceback.format_exc())
            raise

    return run


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


class HangAfterStep(TrainerCallback):
    def __init__(self, step: int, signal_dir: str, what: str):
        self.step, self.signal_dir, self.what = step, signal_dir, what

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            hang(self.signal_dir, self.what)


@reporting_errors
def main(output_dir: str, signal_dir: str, where: str) -> None:
    hang_name = f"step-{HANG_STEP:08d}.json"

    def open_that_hangs(path, *args, **kwargs):
        file = builtins.open(path, *args, **kwargs)
        return HalfWrittenFile(file, signal_dir) if hang_name in os.fspath(path) else file

    def slow_open(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)).startswith(".step-"):
            time.sleep(SLOW_WRITE)
        return builtins.open(path, *args, **kwargs)

    class HangingTrainer(GradTrainer):
        def _save_rng_state(self, output_dir):
            if where == "save" and self.state.global_step == HANG_STEP:
                hang(signal_dir, "save")
            super()._save_rng_state(output_dir)

    trainer = make_trainer(output_dir, HangingTrainer, **(TERM_SETTINGS if where == "term" else {}))
    if where == "snapshot":
        atomic.open = open_that_hangs  # module global: shadows the builtin inside hf_gradtools.atomic only
    elif where == "term":
        atomic.open = slow_open
        trainer.add_callback(HangAfterStep(TERM_STEP, signal_dir, "term"))
    elif where == "step":

        def hang_in_step(module, inputs):
            if trainer.state.global_step == HANG_STEP:  # step 7 is running
                hang(signal_dir, "step")

        trainer.model.classifier.register_forward_pre_hook(hang_in_step)
    trainer.train()


class ReportSteps(TrainerCallback):
    def __init__(self, connection):
        self.connection = connection

    def on_step_end(self, args, state, control, **kwargs):
        self.connection.send(state.global_step)


@reporting_errors
def train_and_report(output_dir: str, signal_dir: str, connection) -> None:
    trainer = make_trainer(output_dir, **KILL_SETTINGS)
    trainer.add_callback(ReportSteps(connection))
    trainer.train()
    connection.send("done")
    time.sleep(600)  # until the test kills us


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
