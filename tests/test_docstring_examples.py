"""The `>>>` examples in the docstrings of the newer modules run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "hf_gradtools.clipping",
    "hf_gradtools.clipping.agc",
    "hf_gradtools.clipping.autoclip",
    "hf_gradtools.clipping.norm",
    "hf_gradtools.clipping.registry",
    "hf_gradtools.snapshots.tensors",
    "hf_gradtools.guards.nonfinite",
    "hf_gradtools.guards.skip",
    "hf_gradtools.monitoring.layer_norms",
    "hf_gradtools.patterns",
    "hf_gradtools.monitoring.noise_scale",
    "hf_gradtools.distributed",
    "hf_gradtools.schedules.eval_mode",
    "hf_gradtools.schedules.live_groups",
    "hf_gradtools.schedules.lr_decay",
    "hf_gradtools.schedules.unfreezing",
]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
