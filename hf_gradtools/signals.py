"""SIGTERM during training: finish the queued writes, then exit with the signal's status.

SIGTERM is what schedulers and spot instances send before they stop a job; by default it ends the process at once,
with the gradient snapshots still queued on the writer thread lost. While `GradTrainer.train` runs (and only then),
`exit_cleanly_on_sigterm` turns SIGTERM into `TrainingTerminated`, a `SystemExit` raised in the main thread at the
point where training was. On the way out every `finally` runs: the trainer's own writes the queued snapshots
(`GradSnapshotCallback.close`), an atomic write removes its temporary file, the user's own clean-up runs. The
process then exits with status 143 (128 + 15), what a shell reports for a process ended by SIGTERM.

Why exit, and not stop at the end of the current optimizer step (as `control.should_training_stop` would): a step
of a large model, the evaluation or best-model loading that `train()` does when it ends, and whatever a script
does after `train()` returns can all outlast the grace period a scheduler gives before its SIGKILL; and stopping
without a checkpoint loses the steps after the last checkpoint either way. Raising, and not writing from inside the
handler, means that nothing waits while the interrupted code holds a lock (a queue's, a logger's): each `with`
releases its own on the way out. A checkpoint being saved is left incomplete, so resuming skips it.

Left alone: a handler the user installed (Python or not: their handler decides, and a `sys.exit` from it unwinds
the same way), an ignored SIGTERM, and `train()` called from a thread other than the main one (Python handles
signals in the main thread only). A second SIGTERM while the first one's exit is under way is ignored, so that a
launcher forwarding the signal to a process that already received it does not cut the writes short.

Example:
    >>> import signal
    >>> with exit_cleanly_on_sigterm():  # as `GradTrainer.train` runs the training
    ...     signal.raise_signal(signal.SIGTERM)  # what a scheduler sends
    Traceback (most recent call last):
    hf_gradtools.signals.TrainingTerminated: 143
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)


class TrainingTerminated(SystemExit):
    """SIGTERM arrived during training; exits with status 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def exit_cleanly_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM raises `TrainingTerminated` in the main thread (see the module docstring).

    The SIGTERM handler in place before the block is put back when it ends, however it ends, unless something
    else replaced this one meanwhile. Nothing is changed when SIGTERM already has a handler or is ignored, or when
    called outside the main thread.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not (
        signal.SIG_DFL
    ):
        yield
        return
    received: list[int] = []

    def terminate(signum: int, frame) -> None:
        if received:  # the exit is under way: let it finish its writes
            return
        received.append(signum)
        raise TrainingTerminated(signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except TrainingTerminated as stop:
        logger.warning(
            "hf_gradtools: SIGTERM during training; the queued writes are finished, exiting with status %d.",
            stop.code,
        )
        raise
    finally:
        if signal.getsignal(signal.SIGTERM) is terminate:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
