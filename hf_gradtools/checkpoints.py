"""Resume from the last checkpoint whose save finished, so that a kill at any moment can be resumed.

The Trainer of transformers 5.24 writes `checkpoint-N/` in place (`Trainer._save_checkpoint`), in this order: the
model, the optimizer and scheduler, the grad scaler, the RNG states, and last `trainer_state.json` (before
rotating out older checkpoints). A process killed while saving leaves a folder without `trainer_state.json`, or
with a cut-off one, and `resume_from_checkpoint=True` would pick that folder as the latest and fail to load it.

Here a checkpoint is complete when its `trainer_state.json` is a whole JSON object and the model was saved (a
weights file, or a sub-folder as FSDP and DeepSpeed write). `trainer_state.json` being written last makes it the
marker of a finished save; the weights test also turns away an older checkpoint whose weights a kill removed while
the Trainer rotated it out. One gap remains: when the same `checkpoint-N/` is saved again (a resumed run passing
step N again), the old `trainer_state.json` would vouch for half-overwritten weights; `begin_checkpoint_save`
deletes it before the new save starts.

`GradTrainer` also records in each checkpoint the settings that decide what its optimizer state covers
(`grad_settings.json`: the freeze settings, with the number of processes and the global batch), and refuses to
resume with other freeze settings (`check_resume_settings`).

Example:
    >>> path = resolve_resume_checkpoint("out", True)  # doctest: +SKIP
    >>> trainer.train(resume_from_checkpoint=path)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .atomic import write_json_atomic
from .errors import GradToolsError
from .state_fields import FieldReader, read_json_record
from .training_args import GRAD_DEFAULTS, grad_setting

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHTS_ENDINGS = (".safetensors", ".bin", ".index.json")
_NOT_WEIGHTS = {"training_args.bin"}


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint, or `None` when it is.

    Complete: `trainer_state.json` holds a whole JSON object (the Trainer writes it last), and the folder holds
    model weights: a `*.safetensors`, `*.bin` (not `training_args.bin`) or `*.index.json` file, or a sub-folder, as
    sharded FSDP and DeepSpeed states are.
    """
    folder = os.fspath(folder)
    state_file = os.path.join(folder, TRAINER_STATE_FILE)
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return f"no {TRAINER_STATE_FILE} (the save did not finish)"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{TRAINER_STATE_FILE} is unreadable ({type(e).__name__}: {e}; the save was cut off)"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{TRAINER_STATE_FILE} is not a Trainer state"
    for entry in os.scandir(folder):
        if entry.is_dir() or (entry.name.endswith(_WEIGHTS_ENDINGS) and entry.name not in _NOT_WEIGHTS):
            return None
    return "no model weights"


def checkpoint_step(folder: str | os.PathLike) -> int:
    """The `global_step` recorded in the checkpoint's `trainer_state.json`."""
    with open(os.path.join(os.fspath(folder), TRAINER_STATE_FILE), encoding="utf-8") as f:
        return int(json.load(f)["global_step"])


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a checkpoint whose save finished (see `checkpoint_problem`)."""
    return checkpoint_problem(folder) is None


def list_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """The `checkpoint-N` folders in `output_dir`, by step, oldest first; `[]` when `output_dir` does not exist."""
    output_dir = os.fspath(output_dir)
    try:
        entries = list(os.scandir(output_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    steps = {}
    for entry in entries:
        match = _CHECKPOINT_DIR.match(entry.name)
        if match is not None and entry.is_dir():
            steps[entry.path] = int(match.group(1))
    return sorted(steps, key=steps.__getitem__)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-N` folder in `output_dir` (highest N), or `None` when there is none.

    Each newer, incomplete one it passes over gets an INFO line of the `hf_gradtools.checkpoints` logger that
    says why (a WARNING when no complete one is found at all).
    """
    skipped = []
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            for path, why in skipped:
                logger.info("Skipping incomplete checkpoint %s: %s; resuming from %s instead.", path, why, folder)
            return folder
        skipped.append((folder, problem))
    for path, why in skipped:
        logger.warning("Skipping incomplete checkpoint %s: %s.", path, why)
    return None


def resolve_resume_checkpoint(
    output_dir: str | os.PathLike, resume_from_checkpoint: str | os.PathLike | bool | None
) -> str | None:
    """What to pass on as the Trainer's `resume_from_checkpoint`, with `True` meaning the last complete checkpoint.

    Args:
        output_dir: the run's `args.output_dir`.
        resume_from_checkpoint: `True` (the last complete checkpoint in `output_dir`), `None` / `False` (no
            resume: `None`), or a path, given back unchanged (a warning is logged when it is incomplete).

    Returns:
        The checkpoint path, or `None`.

    Raises:
        ValueError: `True` and no complete checkpoint in `output_dir`, with the Trainer's own message.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"No valid checkpoint found in output directory ({os.fspath(output_dir)})")
        return found
    path = os.fspath(resume_from_checkpoint)
    if os.path.isdir(path):
        problem = checkpoint_problem(path)
        if problem is not None:
            logger.warning("Resuming from %s, which looks incomplete: %s.", path, problem)
    return path


def begin_checkpoint_save(folder: str | os.PathLike) -> None:
    """Call just before saving into `folder` (by the process that writes `trainer_state.json`).

    When `folder` holds an earlier save (a resumed run reaching the same step again), its `trainer_state.json` is
    deleted first, so that until the new one is written the folder counts as incomplete, not as the old save over
    half-written new weights. A folder that does not exist yet is left alone.
    """
    try:
        os.remove(os.path.join(os.fspath(folder), TRAINER_STATE_FILE))
    except (FileNotFoundError, NotADirectoryError):
        pass


# ---- the gradient-tool settings a checkpoint was saved with ----

RUN_SETTINGS_FILE = "grad_settings.json"
# Settings that decide which parameters the optimizer state covers: a resume must not change them.
FROZEN_SETTINGS = ("freeze_embeddings", "freeze_first_n_layers")


class ChangedSettingsError(GradToolsError):
    """A run resumes from a checkpoint saved with other freeze settings."""


def run_settings(args) -> dict:
    """What `save_run_settings` records: the freeze settings, the number of processes and the global batch."""
    world_size = max(1, int(getattr(args, "world_size", 1)))
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    return {**{name: grad_setting(args, name) for name in FROZEN_SETTINGS}, "world_size": world_size, "batch": batch}


def check_run_settings(record) -> dict:
    """`record` as `save_run_settings` writes it, or `StateFieldError` naming the field: every field present, of its
    type, in its range, and no other."""
    fields = FieldReader(record)
    checked = {
        "freeze_embeddings": fields.boolean("freeze_embeddings"),
        "freeze_first_n_layers": fields.integer("freeze_first_n_layers"),
        "world_size": fields.integer("world_size", low=1),
        "batch": fields.integer("batch", low=1),
    }
    fields.done()
    return checked


def save_run_settings(folder: str | os.PathLike, settings: dict) -> None:
    """Write `settings` (see `run_settings`) atomically to `RUN_SETTINGS_FILE` in the checkpoint `folder`."""
    write_json_atomic(os.path.join(os.fspath(folder), RUN_SETTINGS_FILE), settings)


def check_resume_settings(folder: str | os.PathLike, settings: dict) -> None:
    """Refuse to resume from `folder` with other freeze settings than it was saved with; warn on another world size.

    A checkpoint without `grad_settings.json` (a default run's, or a plain Trainer's) counts as saved with the
    default freeze settings. A record that cannot be read, or holds anything else than what `save_run_settings`
    writes, is refused: it is never passed over.

    Args:
        folder: the checkpoint to resume from.
        settings: this run's, from `run_settings`.

    Raises:
        ChangedSettingsError: a freeze setting differs; the message names the checkpoint's and this run's values.
        DamagedCheckpointError: the record is unreadable or damaged; the message names the file and the field.
    """
    folder = os.fspath(folder)
    try:
        saved = read_json_record(os.path.join(folder, RUN_SETTINGS_FILE), check_run_settings)
    except (FileNotFoundError, NotADirectoryError):
        # Written only by runs that freeze (so a default run's checkpoints hold the Trainer's files alone).
        logger.info(
            "%s records no gradient-tool settings (%s): it was saved without freezing by hf_gradtools (or by a "
            "plain Trainer), and is compared as such.",
            folder,
            RUN_SETTINGS_FILE,
        )
        saved = {name: GRAD_DEFAULTS[name] for name in FROZEN_SETTINGS}
    if any(saved[name] != settings[name] for name in FROZEN_SETTINGS):
        then = ", ".join(f"`{name}`={saved[name]!r}" for name in FROZEN_SETTINGS)
        now = ", ".join(f"`{name}`={settings[name]!r}" for name in FROZEN_SETTINGS)
        raise ChangedSettingsError(
            f"Cannot resume from {folder}: it was saved with {then}, and this run has {now}. Its optimizer state "
            "covers only the parameters trainable then. Resume with the checkpoint's settings, or start a new run "
            "from its weights (load the model from the folder, no `resume_from_checkpoint`)."
        )
    if saved.get("world_size", settings["world_size"]) != settings["world_size"]:
        then, now = saved["batch"], settings["batch"]
        rows = f"still takes {now} rows" if then == now else f"takes {now} rows, where it took {then}"
        logger.warning(
            "Resuming from %s, saved by %d process(es), with %d: the weights, optimizer, scheduler and step carry "
            "over, and an optimizer step %s; processes without an RNG state in the checkpoint start from the seed.",
            folder,
            saved["world_size"],
            settings["world_size"],
            rows,
        )
