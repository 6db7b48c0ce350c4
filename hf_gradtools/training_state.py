"""The state of the gradient tools that a checkpoint must carry beside the optimizer's, in one small JSON file.

`checkpoint-N/hf_gradtools_state.json` holds the gradual-unfreezing position (`GradualUnfreezer.state_dict`) and
the noise-scale moving averages (`GradientNoiseScale.state_dict`), each only when it is in use:

    {"unfreezer": {"position": 2, "every_n_steps": 100, "labels": ["layer.1", "layer.0", "embeddings"]},
     "noise_scale": {"beta": 0.95, "grad_sq_norm_ema": 0.012, "trace_cov_ema": 0.9, "steps": 40}}

and the state of the clip algorithm under its name where it keeps one (AutoClip's history:
`"autoclip": {"history": [...]}`; a registered algorithm's `state_dict()`), and the non-finite guard's counts
(`"nonfinite_guard": {...}`).

Written atomically (`atomic.py`) by the process that saves; read by every process when resuming, as untrusted
input: each entry is checked by its component's `check_state` (`state_checks()`: `COMPONENT_CHECKS` and the clip
algorithms', `clipping.clip_state_checks`), and a file that is not JSON, holds
an unknown entry or a field of the wrong type or range is refused with one `DamagedCheckpointError` naming the file
and the field (`autoclip.history[3]`); so is a per-step record longer than the checkpoint's `global_step` (its
`trainer_state.json`), e.g. an AutoClip history of 7 norms at step 2. `GradTrainer` reads it before a resume deletes
or loads anything.

Example:
    >>> unfreezer = {"position": 2, "every_n_steps": 100, "labels": ["layer.1", "layer.0", "embeddings"]}
    >>> save_training_state("out/checkpoint-10", {"unfreezer": unfreezer})
    >>> load_training_state("out/checkpoint-10")["unfreezer"]["position"]
    2
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from .atomic import write_json_atomic
from .checkpoints import TRAINER_STATE_FILE
from .clipping import clip_state_checks
from .guards import NonFiniteGuard
from .noise_scale import GradientNoiseScale
from .run_folder import is_count
from .schedules.unfreezing import GradualUnfreezer
from .state_fields import FieldReader, read_json_record

TRAINING_STATE_FILE = "hf_gradtools_state.json"

# The entries of the components other than the clip algorithm, and the check of each (raising `StateFieldError`
# naming the field). A clip algorithm's entry is under its registered name (`clipping.registry.RESERVED_NAMES` keeps
# these names free of them).
COMPONENT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "unfreezer": GradualUnfreezer.check_state,
    "noise_scale": GradientNoiseScale.check_state,
    "nonfinite_guard": NonFiniteGuard.check_state,
}


# Entries that record one value per optimizer step, and the list that holds them: AutoClip appends the total norm
# of every step (NaN for a non-finite one, a skipped step included), so its history is never longer than the
# checkpoint's `global_step`. It may be shorter: a run that switched AutoClip on when it resumed starts it afresh.
PER_STEP_RECORDS = {"autoclip": ("history", "norms")}


def state_checks(clip_checks: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, Callable[[Any], Any]]:
    """Each entry the file may hold and its check: `COMPONENT_CHECKS`, and those of the registered clip algorithms
    that keep state (`clip_checks`, default `clip_state_checks()`)."""
    return {**COMPONENT_CHECKS, **(clip_state_checks() if clip_checks is None else clip_checks)}


def save_training_state(folder: str | os.PathLike, state: dict) -> None:
    """Write `state` (plain Python values) to `folder/hf_gradtools_state.json`, atomically."""
    write_json_atomic(os.path.join(folder, TRAINING_STATE_FILE), state)


def check_training_state(
    state: Any, clip_checks: dict[str, Callable[[Any], Any]] | None = None, steps: int | None = None
) -> dict:
    """`state` with every entry checked by `state_checks(clip_checks)`, or `StateFieldError` naming the entry and
    the field. With `steps` (the checkpoint's `global_step`), a per-step record (`PER_STEP_RECORDS`) holding more
    values than steps were taken is refused too."""
    checks = state_checks(clip_checks)
    fields = FieldReader(state)
    checked = {key: fields.entry(key, check) for key, check in checks.items() if key in fields.state}
    fields.done(known=checks)
    for key, (field, what) in PER_STEP_RECORDS.items() if steps is not None else ():
        entry = checked.get(key)
        values = entry.get(field) if isinstance(entry, dict) else None
        if isinstance(values, list):
            fields.check(
                len(values) <= steps,
                f"{key}.{field}",
                f"holds {len(values)} {what}, more than the {steps} optimizer steps of the checkpoint (`global_step` "
                f"in its {TRAINER_STATE_FILE}): one is recorded per step",
            )
    return checked


def checkpoint_steps(folder: str | os.PathLike) -> int | None:
    """The `global_step` of the checkpoint `folder` (its `trainer_state.json`); None where that file does not say
    (none, unreadable, or no integer step: the Trainer refuses such a checkpoint itself when loading it)."""
    try:
        with open(os.path.join(os.fspath(folder), TRAINER_STATE_FILE), encoding="utf-8") as f:
            step = json.load(f).get("global_step")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return None
    return step if is_count(step) else None


def load_training_state(folder: str | os.PathLike, clip_checks: dict[str, Callable[[Any], Any]] | None = None) -> dict:
    """What `save_training_state` wrote in `folder`, checked; `{}` when the checkpoint has no such file.

    Args:
        clip_checks: the checks of the clip algorithms' entries (default: `clipping.clip_state_checks()`; the
            trainer passes the run's, which load its algorithm's entry into a fresh instance).

    Raises:
        DamagedCheckpointError: the file cannot be read, or an entry or field is not what the package writes (also
            a per-step record longer than the checkpoint's `global_step`, `check_training_state`).
    """
    steps = checkpoint_steps(folder)
    try:
        return read_json_record(
            os.path.join(os.fspath(folder), TRAINING_STATE_FILE),
            lambda state: check_training_state(state, clip_checks, steps),
        )
    except (FileNotFoundError, NotADirectoryError):
        return {}
