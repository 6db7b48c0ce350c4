"""The loss probe leaves no trace: a model whose forward keeps state ends a GradTrainer run as it ends a Trainer run.

The probe (`loss_probe.py`) evaluates the loss on parts of the first window before training on it. A forward pass
can change more than its output: buffers (a running count, a record of the rows seen, a replaced cache) and the
numpy and Python random generators. Each test trains the same model on the same rows with `Trainer` and with
`GradTrainer` (every field at its default) and compares what the Trainer would keep: weights, buffers, the saved
`model.safetensors`, and the generators after training; and a run resumed from a checkpoint in the middle of an
epoch against the uninterrupted one.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import load_file
from torch import nn

from hf_gradtools import GradTrainer

ROWS = 10
BATCH = 2


class RowRecorder(nn.Module):
    """A linear classifier whose forward counts the rows it sees (in place), counts its calls (in place) and keeps
    the ids of the last batch (a buffer replaced by assignment). Column 0 of each input is the row's id."""

    def __init__(self, noise: bool = False):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.noise = noise
        self.register_buffer("rows_seen", torch.zeros(ROWS, dtype=torch.long))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_rows", torch.zeros(BATCH, dtype=torch.long))

    def forward(self, inputs, labels=None):
        ids = inputs[:, 0].long()
        self.rows_seen.index_add_(0, ids, torch.ones_like(ids))
        self.calls += 1
        self.last_rows = ids.clone()
        logits = self.fc(inputs)
        if self.noise:  # draws from the generators a model may use besides torch's
            logits = logits + torch.tensor([np.random.rand(), random.random(), 0.0])
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class IdRows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(ROWS, 4, generator=g)
        self.x[:, 0] = torch.arange(ROWS, dtype=torch.float)
        self.y = torch.randint(0, 3, (ROWS,), generator=g)

    def __len__(self):
        return ROWS

    def __getitem__(self, i):
        return {"inputs": self.x[i], "labels": self.y[i]}


def make(trainer_cls, output_dir, noise=False, **overrides):
    torch.manual_seed(0)
    model = RowRecorder(noise=noise)
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        learning_rate=0.1,
        optim="sgd",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return trainer_cls(model=model, args=T.TrainingArguments(**settings), train_dataset=IdRows())


def buffers(model) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


def assert_same_model(grad_model, plain_model) -> None:
    for (name, a), b in zip(grad_model.state_dict().items(), plain_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: {a.tolist()} (GradTrainer) != {b.tolist()} (Trainer)"


@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_probe_leaves_buffers_as_the_trainer_leaves_them(tmp_path, accumulation):
    plain = make(T.Trainer, tmp_path / "plain", gradient_accumulation_steps=accumulation, save_strategy="epoch")
    grad = make(GradTrainer, tmp_path / "grad", gradient_accumulation_steps=accumulation, save_strategy="epoch")
    plain.train()
    grad.train()
    # Each row once per epoch, one call per micro-batch: what the Trainer's own forward passes leave.
    assert plain.model.rows_seen.tolist() == [2] * ROWS
    assert plain.model.calls.item() == 2 * ROWS // BATCH
    assert_same_model(grad.model, plain.model)
    # A mean over rows divided by the window's micro-batches (3, then 2): the Trainer's divisor, so its losses.
    logged = lambda t: [(h["step"], h.get("loss"), h.get("grad_norm")) for h in t.state.log_history]  # noqa: E731
    assert logged(grad) == logged(plain)
    last = f"checkpoint-{plain.state.global_step}"
    saved_plain = load_file(os.path.join(tmp_path / "plain", last, "model.safetensors"))
    saved_grad = load_file(os.path.join(tmp_path / "grad", last, "model.safetensors"))
    assert saved_grad.keys() == saved_plain.keys()
    for name in saved_plain:
        assert torch.equal(saved_grad[name], saved_plain[name]), name


def test_resumed_run_sees_the_rows_of_the_uninterrupted_run(tmp_path):
    """Resumed from step 7 of 10 (the middle of epoch 2; batch 2, no accumulation), the model ends with the buffers
    and weights of the run that was never stopped, and with those of the Trainer doing the same."""
    runs = {}
    for name, cls in (("plain", T.Trainer), ("grad", GradTrainer)):
        full = make(cls, tmp_path / name / "full", gradient_accumulation_steps=1, save_strategy="steps", save_steps=1)
        full.train()
        resumed = make(cls, tmp_path / name / "resumed", gradient_accumulation_steps=1)
        resumed.train(resume_from_checkpoint=str(tmp_path / name / "full" / "checkpoint-7"))
        assert resumed.state.global_step == full.state.global_step == 10
        runs[name] = (full.model, resumed.model)
    assert_same_model(runs["plain"][1], runs["plain"][0])  # the Trainer resumes to its uninterrupted run
    assert_same_model(runs["grad"][0], runs["plain"][0])
    assert_same_model(runs["grad"][1], runs["grad"][0])


def test_probe_leaves_numpy_and_python_generators_alone(tmp_path):
    """A forward that draws from numpy and `random` trains to the Trainer's weights; both generators end where
    the Trainer leaves them."""
    results = {}
    for name, cls in (("plain", T.Trainer), ("grad", GradTrainer)):
        trainer = make(cls, tmp_path / name, noise=True, gradient_accumulation_steps=1)
        trainer.train()
        results[name] = (trainer.model.fc, np.random.rand(), random.random())
    assert_same_model(results["grad"][0], results["plain"][0])  # the weights: the buffers are the test above
    assert results["grad"][1:] == results["plain"][1:]


class StatisticInAParameter(RowRecorder):
    """Keeps a running count in a frozen parameter rather than a buffer: the probe cannot put it back."""

    def __init__(self):
        super().__init__()
        self.seen = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, inputs, labels=None):
        self.seen.add_(inputs.shape[0])
        return super().forward(inputs, labels)


def test_a_parameter_the_probe_changes_in_place_is_said(tmp_path):
    trainer = make(GradTrainer, tmp_path, gradient_accumulation_steps=2)
    trainer.model = trainer.model_wrapped = StatisticInAParameter()
    with pytest.warns(UserWarning, match="changed the parameters seen in place"):
        trainer.train()
