"""SIGTERM during training exits after the queued writes, with the signal's status; outside training, or where a
handler of one's own is installed, signals are left alone. (A real SIGTERM to a training process with snapshots
queued: `tests/checkpoints/test_faults.py::test_sigterm_writes_the_queued_snapshots_then_exits`.)"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from transformers import TrainerCallback

from hf_gradtools import GradTrainer, freeze_embeddings
from hf_gradtools.signals import TrainingTerminated, exit_cleanly_on_sigterm
from tests.conftest import classification_data, tiny_classifier


@pytest.fixture(autouse=True)
def default_sigterm():
    """SIGTERM at its default for the test, whatever the test runner installed; put back afterwards."""
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, before)


def send_sigterm_to_myself() -> None:
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)  # or it would end pytest
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # the handler runs in the main thread at its next instruction


def test_sigterm_raises_a_system_exit_with_the_signals_status_and_the_handler_goes_back():
    with pytest.raises(TrainingTerminated) as raised, exit_cleanly_on_sigterm():
        send_sigterm_to_myself()
    assert isinstance(raised.value, SystemExit) and not isinstance(raised.value, Exception)
    assert raised.value.code == 128 + signal.SIGTERM == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_sigterm_does_not_cut_the_exit_short():
    finished = []
    with pytest.raises(TrainingTerminated), exit_cleanly_on_sigterm():
        try:
            send_sigterm_to_myself()
        finally:  # the clean-up on the way out (the snapshot writer's flush) gets a second signal
            send_sigterm_to_myself()
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("own", [lambda signum, frame: None, signal.SIG_IGN], ids=["handler", "ignored"])
def test_a_sigterm_handler_of_ones_own_is_left_alone(own):
    signal.signal(signal.SIGTERM, own)
    with exit_cleanly_on_sigterm():
        assert signal.getsignal(signal.SIGTERM) is own
    assert signal.getsignal(signal.SIGTERM) is own


def test_outside_the_main_thread_signals_are_left_alone():
    seen = []

    def train_in_a_thread():
        with exit_cleanly_on_sigterm():
            seen.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=train_in_a_thread)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL]


class SeeSigterm(TrainerCallback):
    def __init__(self, fail_at: int | None = None):
        self.seen, self.fail_at = [], fail_at

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(signal.getsignal(signal.SIGTERM))
        if state.global_step == self.fail_at:
            raise RuntimeError("a step failed")


def frozen_by_hand():
    model = tiny_classifier()
    freeze_embeddings(model)  # a frozen-parameter record to write at train begin, and no snapshot
    return model


@pytest.mark.parametrize(
    "settings, model, handled",
    [({"grad_snapshot_steps": 1}, tiny_classifier, True), ({}, tiny_classifier, False), ({}, frozen_by_hand, False)],
    ids=["with-snapshots", "defaults", "frozen-by-hand"],
)
def test_gradtrainer_handles_sigterm_only_while_it_trains_snapshots(args_factory, settings, model, handled):
    see = SeeSigterm()
    trainer = GradTrainer(
        model=model(), args=args_factory(**settings), train_dataset=classification_data(), callbacks=[see]
    )
    trainer.train()
    assert len(see.seen) == 3
    assert all((handler is not signal.SIG_DFL) is handled for handler in see.seen)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    failing = SeeSigterm(fail_at=2)
    trainer = GradTrainer(
        model=tiny_classifier(),
        args=args_factory(**settings),
        train_dataset=classification_data(),
        callbacks=[failing],
    )
    with pytest.raises(RuntimeError, match="a step failed"):
        trainer.train()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back however training ends
