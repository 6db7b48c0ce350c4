"""Undo what forward passes run only to measure something did to the model and to the random generators.

A forward pass can change more than its output: a model may count or record into its buffers (in place, or by
assigning a new tensor), build a cache buffer on first use, or draw from numpy's or Python's generator. The loss
probe runs such passes before training on a window; the Trainer never runs them, so whatever they leave behind
would end up in the weights file of every checkpoint and in the numbers of the rest of the run (and a resumed run
would repeat it). `torch.random.fork_rng` restores torch's generators; `undo_forward_side_effects` restores the
rest: every module's buffers as they were (same tensors, same values, none added) and both generators. A parameter
changed in place (its version counter moved) is said in a warning, not put back. What the passes do outside the
model is not undone either: the loss is computed through the trainer's own `compute_loss` (a subclass's too), so a
metric it records, or a forward hook that counts, sees them; `loss_normalization` set to a rule (or `trainer`)
measures nothing.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn


@contextlib.contextmanager
def undo_forward_side_effects(model: nn.Module) -> Iterator[None]:
    """On exit (also by an exception): `model`'s buffers and the numpy and `random` generators as on entry."""
    held = [(module, dict(module._buffers)) for module in model.modules()]
    values = {id(t): t.detach().clone() for _, buffers in held for t in buffers.values() if t is not None}
    versions = {name: p._version for name, p in model.named_parameters()}  # a copy of each would cost the model again
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        changed = [name for name, p in model.named_parameters() if versions.get(name, p._version) != p._version]
        if changed:
            warnings.warn(
                f"The loss probe's forward passes changed the parameters {', '.join(changed[:5])} in place (a running "
                "statistic kept in a parameter?); they are not put back, so this run's values differ from the "
                "Trainer's from here. Keep such state in a buffer, or set `loss_normalization` so that the loss is "
                "not measured.",
                stacklevel=3,
            )
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        with torch.no_grad():
            for module, buffers in held:
                for name in [name for name in module._buffers if name not in buffers]:
                    del module._buffers[name]  # registered by the forward pass
                    module._non_persistent_buffers_set.discard(name)
                for name, tensor in buffers.items():
                    module._buffers[name] = tensor  # a buffer replaced by assignment gets its tensor back
                    if tensor is not None:
                        tensor.copy_(values[id(tensor)])  # and a buffer changed in place its values
