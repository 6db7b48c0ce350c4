"""The state of the gradient tools that a checkpoint must carry beside the optimizer's, in one small JSON file.

`checkpoint-N/hf_gradtools_state.json` holds the gradual-unfreezing position (`GradualUnfreezer.state_dict`) and
the noise-scale moving averages (`GradientNoiseScale.state_dict`), each only when it is in use:

    {"unfreezer": {"position": 2, "every_n_steps": 100, "labels": ["layer.1", "layer.0", "embeddings"]},
     "noise_scale": {"beta": 0.95, "grad_sq_norm_ema": 0.012, "trace_cov_ema": 0.9, "steps": 40}}

and, with issue 9's fields, AutoClip's history (`"autoclip": {"history": [...]}`) and the non-finite guard's counts
(`"nonfinite_guard": {...}`).

Written atomically (`atomic.py`) by the process that saves; read by every process when resuming.

Example:
    >>> save_training_state("out/checkpoint-10", {"unfreezer": unfreezer.state_dict()})  # doctest: +SKIP
    >>> load_training_state("out/checkpoint-10")["unfreezer"]["position"]  # doctest: +SKIP
    2
"""

from __future__ import annotations

import json
import os

from .atomic import write_json_atomic

TRAINING_STATE_FILE = "hf_gradtools_state.json"


def save_training_state(folder: str | os.PathLike, state: dict) -> None:
    """Write `state` (plain Python values) to `folder/hf_gradtools_state.json`, atomically."""
    write_json_atomic(os.path.join(folder, TRAINING_STATE_FILE), state)


def load_training_state(folder: str | os.PathLike) -> dict:
    """What `save_training_state` wrote in `folder`, or `{}` when the checkpoint has no such file."""
    path = os.path.join(folder, TRAINING_STATE_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
