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

A save that runs out of space (`ENOSPC`, `EDQUOT`) is reported by `checkpoint_save_error`: which file, the errno,
and that the folder, left incomplete, is skipped on resume; torch's own message (`unexpected pos 49344 vs 49236`)
names neither the file nor the cause.

Each checkpoint also holds the state of the run's components (`hf_gradtools_state.json`, the section at the end of
this module), read back as untrusted input before a resume deletes or loads anything.

Example (`checkpoint-20/` was cut short by a kill, no `trainer_state.json`: resuming takes `checkpoint-10/`):
    >>> from pathlib import Path
    >>> import torch
    >>> from safetensors.torch import save_file
    >>> for step in (10, 20):
    ...     Path(f"out/checkpoint-{step}").mkdir(parents=True)
    ...     save_file({"w": torch.zeros(1)}, f"out/checkpoint-{step}/model.safetensors")
    >>> _ = Path("out/checkpoint-10/trainer_state.json").write_text('{"global_step": 10}')
    >>> path = resolve_resume_checkpoint("out", True)
    >>> path
    'out/checkpoint-10'
    >>> trainer.train(resume_from_checkpoint=path)  # a Trainer run  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from safetensors import SafetensorError
from transformers import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .atomic import write_json_atomic
from .clipping import clip_state_checks
from .damaged_files import damaged_files
from .errors import ChangedSettingsError, CheckpointSaveError, DamagedCheckpointError
from .freezing.auto import AutoFreeze
from .guards import NonFiniteGuard, SkipSpikes
from .monitoring.noise_scale import GradientNoiseScale
from .run_folder import (
    MAX_COUNT,
    inside_run_folder,
    is_count,
    is_finite_number,
    is_number,
    is_within,
    not_a_regular_file,
)
from .schedules.unfreezing import GradualUnfreezer
from .settings import GradSettings
from .state_fields import FieldReader, read_json_record, shown

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_DIR = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHTS_ENDINGS = (".safetensors", ".bin", ".index.json")
_NOT_WEIGHTS = {"training_args.bin"}
# Temporary files of writes a kill cut short: safetensors' (the `tempfile` crate's) and `atomic.write_file_atomic`'s.
_INTERRUPTED_WRITE = re.compile(r"^\.tmp[A-Za-z0-9]{6}$|^\..+\.\d+\.\d+\.tmp$")


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint, or `None` when it is.

    Complete: `trainer_state.json` holds a whole JSON object (the Trainer writes it last) of the step the folder's
    name says, the folder holds
    model weights: a `*.safetensors`, `*.bin` (not `training_args.bin`) or `*.index.json` file, or a sub-folder, as
    sharded FSDP and DeepSpeed states are; and none of the files a resume loads is damaged (`damaged_files`).
    """
    folder = os.fspath(folder)
    problem = _state_file_problem(folder) or _step_problem(folder) or _weights_problem(folder)
    if problem is not None:
        return problem
    damaged = damaged_files(folder)
    return _damage(damaged) if damaged else None


def _weights_problem(folder: str) -> str | None:
    def weights(entry) -> bool:
        try:
            return entry.is_dir() or (entry.name.endswith(_WEIGHTS_ENDINGS) and entry.name not in _NOT_WEIGHTS)
        except OSError:  # a link loop
            return False

    with os.scandir(folder) as entries:
        if any(weights(e) for e in entries):
            return None
    return "no model weights"


def _state_file_problem(folder: str) -> str | None:
    """Why `trainer_state.json` in `folder` does not mark a finished save, or `None`."""
    path = os.path.join(folder, TRAINER_STATE_FILE)
    if not_a_regular_file(path):
        return f"{TRAINER_STATE_FILE} is not a regular file (a folder, pipe or device)"
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return f"no {TRAINER_STATE_FILE} (the save did not finish)"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"{TRAINER_STATE_FILE} is unreadable ({type(e).__name__}: {e}; the save was cut off)"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"{TRAINER_STATE_FILE} is not a Trainer state"
    return None


def _step_problem(folder: str) -> str | None:
    """A finished save's step other than its `checkpoint-N` folder's N (a copy under another name: resuming it
    would give the wrong step), or `None`."""
    named = _CHECKPOINT_DIR.match(os.path.basename(os.path.normpath(folder)))
    if named is None:
        return None
    with open(os.path.join(folder, TRAINER_STATE_FILE), encoding="utf-8") as f:
        step = json.load(f)["global_step"]
    if is_count(step) and step != int(named.group(1)):
        return f"{TRAINER_STATE_FILE} is of step {step}, not of the folder's step {named.group(1)}"
    return None


def _damage(damaged: list[tuple[str, str]], full_paths: bool = False) -> str:
    return "; ".join(f"{path if full_paths else os.path.basename(path)} is damaged ({why})" for path, why in damaged)


def checkpoint_step(folder: str | os.PathLike) -> int:
    """The `global_step` recorded in the checkpoint's `trainer_state.json`.

    Raises:
        DamagedCheckpointError: the recorded step is not an integer from 0 to 2**53, or another field is one the
            resumed Trainer would fail on (`check_trainer_state_fields`).
    """
    path = os.path.join(os.fspath(folder), TRAINER_STATE_FILE)
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    step = state["global_step"]
    if not is_count(step):
        raise DamagedCheckpointError(
            f"{path} is damaged: `global_step` is {shown(step)}, not a step number (an integer from 0 to "
            f"{MAX_COUNT}). The checkpoint cannot be resumed from: resume from another one."
        )
    check_trainer_state_fields(path, state)
    return step


# What the resumed Trainer does with each field of `trainer_state.json`: appends to it, counts with it, compares it.
_STATE_FIELDS = {
    "log_history": (lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v), "a list of log entries"),
    "epoch": (lambda v: v is None or is_finite_number(v) and v >= 0, "a non-negative number or null"),
    "best_metric": (lambda v: v is None or is_number(v), "a number or null"),
    "best_global_step": (lambda v: v is None or is_count(v), "a step number or null"),
    "stateful_callbacks": (lambda v: isinstance(v, dict), "an object"),
    **{  # the Trainer records `save_steps` and its kind as given: 1.0, or a ratio such as 0.25
        name: (lambda v: v is None or is_finite_number(v) and v >= 0, "a non-negative number or null")
        for name in ("max_steps", "num_train_epochs", "logging_steps", "eval_steps", "save_steps", "train_batch_size")
    },
}


def check_trainer_state_fields(path: str, state: dict) -> None:
    """Refuse (`DamagedCheckpointError`, naming the file and field) a `trainer_state.json` whose fields the resumed
    Trainer would fail on (a `log_history` that is not a list, a count that is text, a field this transformers'
    `TrainerState` does not have), or that would lead it out of the run folder (a `best_model_checkpoint`
    elsewhere, which `load_best_model_at_end` would load and the checkpoint rotation would keep in place of this
    run's)."""
    unknown = sorted(set(state) - {f.name for f in dataclasses.fields(TrainerState)})
    if unknown:
        raise DamagedCheckpointError(
            f"{path} is damaged or of another transformers version: {', '.join(f'`{k}`' for k in unknown)} is not a "
            "field of this version's `TrainerState`. The checkpoint cannot be resumed from: resume from another one."
        )
    best = state.get("best_model_checkpoint")
    run_folder = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if best is not None and (
        not isinstance(best, str) or not is_within(os.path.realpath(best), os.path.realpath(run_folder))
    ):
        raise DamagedCheckpointError(
            f"{path} is damaged: `best_model_checkpoint` is {shown(best)}, not a checkpoint of this run folder "
            f"({run_folder}; a run folder that was moved keeps its old path there: correct it, or set it to null). "
            "The checkpoint cannot be resumed from as it is."
        )
    for name, (ok, allowed) in _STATE_FIELDS.items():
        if name in state and not ok(state[name]):
            raise DamagedCheckpointError(
                f"{path} is damaged: `{name}` is {shown(state[name])}, not {allowed}. The checkpoint cannot be "
                "resumed from: resume from another one."
            )


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

    Each newer, incomplete one it passes over gets a line of the `hf_gradtools.checkpoints` logger that says why:
    INFO for a save cut short (no whole `trainer_state.json`), WARNING for a finished save with a damaged file, and
    for all when no complete one is found.
    """
    skipped = []
    for folder in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            for path, why in skipped:
                # A save cut short is expected after a kill; a damaged file in a finished save is not.
                level = logging.WARNING if _state_file_problem(path) is None else logging.INFO
                logger.log(
                    level, "Skipping incomplete checkpoint %s: %s; resuming from %s instead.", path, why, folder
                )
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
        resume_from_checkpoint: `True` (the last complete checkpoint in `output_dir`; one with a damaged file that
            the resume loads is passed over), `None` / `False` (no resume: `None`), or a path, given back unchanged
            (a warning is logged when it is incomplete).

    Returns:
        The checkpoint path, or `None`.

    Raises:
        ValueError: `True` and no complete checkpoint in `output_dir`, with the Trainer's own message.
        DamagedCheckpointError: the path names a checkpoint with a damaged file that the resume loads (which file,
            how), or an unreadable `trainer_state.json`.
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
        damaged = damaged_files(path)
        state_problem = _state_file_problem(path)
        if state_problem is None:
            state_problem = _step_problem(path)
        if damaged or (state_problem is not None and os.path.lexists(os.path.join(path, TRAINER_STATE_FILE))):
            why = _damage(damaged, full_paths=True) if damaged else os.path.join(path, state_problem)
            raise DamagedCheckpointError(
                f"Cannot resume from {path}: {why}. Resume from another checkpoint, or with "
                "`resume_from_checkpoint=True` to take the newest complete one."
            )
        problem = state_problem or _weights_problem(path)
        if problem is not None:
            logger.warning("Resuming from %s, which looks incomplete: %s.", path, problem)
    return path


def check_checkpoint_entries(output_dir: str | os.PathLike) -> None:
    """Refuse, before training, what a `checkpoint-N` entry of `output_dir` would make go wrong later: a link out of
    the run folder (also a dangling one, and anything such a checkpoint holds, `check_checkpoint_links`), or a file
    or other entry where the Trainer would save a checkpoint folder (`FileExistsError` at that save).

    Raises:
        OutsideRunFolderError: a link leads out of `output_dir`.
        DamagedCheckpointError: an entry named as a checkpoint is not a folder.
    """
    try:
        entries = sorted(os.scandir(output_dir), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if _CHECKPOINT_DIR.match(entry.name) is None:
            continue
        inside_run_folder(output_dir, entry.path)
        if not os.path.isdir(entry.path):
            raise DamagedCheckpointError(
                f"{entry.path} is not a folder (a file, or a link to nothing), where the Trainer saves a checkpoint: "
                "move it out of the run folder."
            )
        check_checkpoint_links(output_dir, entry.path)


def check_checkpoint_links(run_folder: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Refuse (`OutsideRunFolderError`) a checkpoint `folder` that is, or holds, a symbolic link leading out of
    `run_folder`: nothing of a checkpoint is read, loaded or written through such a link. A missing folder passes.

    Example:
        >>> import os
        >>> os.makedirs("out/checkpoint-2")
        >>> os.symlink("/etc/hostname", "out/checkpoint-2/optimizer.pt")
        >>> check_checkpoint_links("out", "out/checkpoint-2")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        hf_gradtools.errors.OutsideRunFolderError: 'out/checkpoint-2/optimizer.pt' leads out of the run folder ...
    """
    if not os.path.lexists(folder):
        return
    inside_run_folder(run_folder, folder)
    for parent, folders, files in os.walk(folder):  # a linked folder inside is checked, not walked into
        for name in folders + files:
            inside_run_folder(run_folder, os.path.join(parent, name))


def begin_checkpoint_save(folder: str | os.PathLike) -> None:
    """Call just before saving into `folder` (by the process that writes `trainer_state.json`).

    When `folder` holds an earlier save (a resumed run reaching the same step again), its `trainer_state.json` is
    deleted first, so that until the new one is written the folder counts as incomplete, not as the old save over
    half-written new weights. So are the temporary files of an earlier save that a kill cut short (safetensors'
    `.tmpXXXXXX`, as large as the weights, and this package's `.<name>.<pid>.<thread>.tmp`): nothing else names
    them, and the new save writes every file again; and the damaged files of the earlier save (`damaged_files`),
    which a save that does not write them (a scaler, weights of another format) would leave to mark the new one
    damaged. Links (symbolic, or hard: a file with other names) are removed too, so that the save writes files of
    its own rather than through them into another checkpoint's, or a file outside the run; a folder that is a link
    is removed (the link only), and the save makes a folder. A folder that does not exist yet is left alone.
    """
    folder = os.fspath(folder)
    if os.path.islink(folder):  # a link to another checkpoint: the save makes a folder of its own
        os.remove(folder)
        return
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    damaged = {path for path, _ in damaged_files(folder)}
    for entry in entries:
        regular = entry.is_file(follow_symlinks=False)
        shared = entry.is_symlink() or (regular and entry.stat(follow_symlinks=False).st_nlink > 1)
        if (
            entry.name == TRAINER_STATE_FILE
            or shared  # a link (symbolic or hard): written through, the save would change another file
            or (regular and _INTERRUPTED_WRITE.match(entry.name))
            or (entry.path in damaged and not entry.is_dir(follow_symlinks=False))  # a pipe too: a save would block
        ):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                os.remove(entry.path)


# ---- a save that runs out of space ----

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_TORCH_WRITE_FAILED = ("unexpected pos", "iostream error", "write failed")  # torch's zip writer, without an errno


def _no_space_errno(error: BaseException, folder: str | os.PathLike) -> int | None:
    """`ENOSPC` or `EDQUOT` when `error` is a write into `folder` that ran out of space, else `None`.

    Python's writes raise `OSError` with the errno, safetensors says `os error 28`, and torch's zip writer
    (`torch.save`) says only `unexpected pos ...`, `iostream error` or `file write failed`: that counts as `ENOSPC`
    when the device of `folder` has no free block left.
    """
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno if error.errno in _NO_SPACE else None
    text = str(error)
    found = re.search(r"os error (\d+)", text)
    if found is not None:
        return int(found.group(1)) if int(found.group(1)) in _NO_SPACE else None
    if isinstance(error, RuntimeError) and any(cue in text for cue in _TORCH_WRITE_FAILED):
        folder = os.fspath(folder)
        try:
            free = os.statvfs(folder if os.path.isdir(folder) else os.path.dirname(folder) or ".").f_bavail
        except OSError:
            return None
        return errno.ENOSPC if free == 0 else None
    return None


_WEIGHT_SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def _failed_file(error: BaseException, folder: str) -> str:
    """The file a failed save of `folder` was writing, as far as `error` and the folder tell.

    The error's own `filename`; else, for safetensors (which removes what it could not finish), the weights file
    (`model.safetensors`, or the shard after the last one on disk); else the file modified last (then the newer
    inode), which torch and Python leave cut short.
    """
    if getattr(error, "filename", None):
        return os.fspath(error.filename)
    try:
        files = [entry for entry in os.scandir(folder) if entry.is_file(follow_symlinks=False)]
    except OSError:
        files = []
    if isinstance(error, SafetensorError):
        shards = sorted(m.groups() for m in map(_WEIGHT_SHARD.match, (e.name for e in files)) if m is not None)
        if not shards:
            return os.path.join(folder, "model.safetensors")
        done, total = shards[-1]
        return os.path.join(folder, f"model-{int(done) + 1:05d}-of-{total}.safetensors")
    if not files:
        return folder
    return max(files, key=lambda e: (e.stat(follow_symlinks=False).st_mtime_ns, e.inode())).path


def checkpoint_save_error(error: BaseException, folder: str | os.PathLike) -> CheckpointSaveError | None:
    """The error to raise, in place of `error`, when `error` stopped the save of the checkpoint `folder` for lack of
    space and left it incomplete; `None` for any other error (raise it as it is).

    The message names the file (`_failed_file`), the errno, and says that `resume_from_checkpoint=True` skips the
    folder, as `last_complete_checkpoint` does.
    """
    folder = os.fspath(folder)
    code = _no_space_errno(error, folder)
    problem = checkpoint_problem(folder) if code is not None else None
    if problem is None:
        return None
    filename = _failed_file(error, folder)
    return CheckpointSaveError(
        code,
        filename,
        f"Could not save the checkpoint {folder}: no space left for {filename} on its device "
        f"({errno.errorcode[code]}, errno {code}: {os.strerror(code)}). The folder is incomplete, {problem}; "
        "`resume_from_checkpoint=True` will skip it and resume from the newest complete checkpoint. Free some "
        "space, then resume.",
    )


# ---- the gradient-tool settings a checkpoint was saved with ----

RUN_SETTINGS_FILE = "grad_settings.json"
# Settings that decide which parameters the optimizer state covers: a resume must not change them.
FROZEN_SETTINGS = ("freeze_embeddings", "freeze_first_n_layers")
# The most processes a record may name: far beyond any run (a million GPUs), far below a number no run has.
MAX_WORLD_SIZE = 2**20


def run_settings(args) -> dict:
    """What `save_run_settings` records: the freeze settings, the number of processes and the global batch."""
    world_size = max(1, int(getattr(args, "world_size", 1)))
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    return {**GradSettings.of(args).freezing(), "world_size": world_size, "batch": batch}


def check_run_settings(record) -> dict:
    """`record` as `save_run_settings` writes it, or `StateFieldError` naming the field: every field present, of its
    type, in its range, and no other; `batch` (per-device batch x accumulation x `world_size`, `run_settings`) a
    multiple of `world_size`."""
    fields = FieldReader(record)
    checked = {
        "freeze_embeddings": fields.boolean("freeze_embeddings"),
        "freeze_first_n_layers": fields.integer("freeze_first_n_layers"),
        "world_size": fields.integer("world_size", low=1, high=MAX_WORLD_SIZE),
        "batch": fields.integer("batch", low=1),
    }
    world_size, batch = checked["world_size"], checked["batch"]
    fields.check(
        batch % world_size == 0,
        "batch",
        f"must be a multiple of `world_size`={world_size} (per-device batch x accumulation x processes), got {batch}",
    )
    fields.done()
    return checked


def save_run_settings(folder: str | os.PathLike, settings: dict) -> None:
    """Write `settings` (see `run_settings`) atomically to `RUN_SETTINGS_FILE` in the checkpoint `folder`."""
    write_json_atomic(os.path.join(os.fspath(folder), RUN_SETTINGS_FILE), settings)


def has_optimizer_state(folder: str) -> bool:
    """Whether `folder` holds an optimizer state file (`optimizer.pt`, or accelerate's `optimizer*.bin`)."""
    return os.path.isdir(folder) and any(
        name.startswith("optimizer") and os.path.isfile(os.path.join(folder, name)) for name in os.listdir(folder)
    )


def check_resume_settings(folder: str | os.PathLike, settings: dict) -> None:
    """Refuse to resume from `folder` with other freeze settings than it was saved with; warn on another world size
    or global batch.

    A checkpoint without `grad_settings.json` (a default run's, or a plain Trainer's) counts as saved with the
    default freeze settings when it holds an optimizer state (which then covers every parameter), and is not
    compared otherwise (a folder of weights only, or no checkpoint at all: the Trainer says so when loading it).
    A record that cannot be read, or holds anything else than what `save_run_settings` writes, is refused: it is
    never passed over.

    Args:
        folder: the checkpoint to resume from.
        settings: this run's, from `run_settings`.

    Raises:
        ChangedSettingsError: a freeze setting differs; the message names the checkpoint's and this run's values.
        DamagedCheckpointError: the record is unreadable or damaged; the message names the file and the field.
    """
    folder = os.fspath(folder)
    recorded = True
    try:
        saved = read_json_record(os.path.join(folder, RUN_SETTINGS_FILE), check_run_settings)
    except (FileNotFoundError, NotADirectoryError):
        # Written only by runs that freeze (so a default run's checkpoints hold the Trainer's files alone).
        if not has_optimizer_state(folder):
            return  # no optimizer state to mismatch (or no checkpoint at all: the Trainer says so when loading)
        logger.info(
            "%s records no gradient-tool settings (%s): it was saved without freezing by hf_gradtools (or by a "
            "plain Trainer), and is compared as such.",
            folder,
            RUN_SETTINGS_FILE,
        )
        saved, recorded = GradSettings().freezing(), False
    if any(saved[name] != settings[name] for name in FROZEN_SETTINGS):
        then = ", ".join(f"`{name}`={saved[name]!r}" for name in FROZEN_SETTINGS)
        now = ", ".join(f"`{name}`={settings[name]!r}" for name in FROZEN_SETTINGS if settings[name] != saved[name])
        how = (
            f"it was saved with {then}, and this run has {now}. Its optimizer state covers only the parameters "
            "trainable then"
            if recorded
            else f"it records no freeze settings ({RUN_SETTINGS_FILE}: a plain Trainer's checkpoint, or one saved "
            f"without freezing), so its optimizer state covers every parameter, and this run has {now}"
        )
        raise ChangedSettingsError(
            f"Cannot resume from {folder}: {how}. Resume with the checkpoint's settings, or start a new run "
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
    elif saved.get("batch", settings["batch"]) != settings["batch"]:
        logger.warning(
            "Resuming from %s with another batch: an optimizer step takes %d rows, where it took %d (per-device "
            "batch x `gradient_accumulation_steps` x processes). The weights, optimizer, scheduler and step carry "
            "over; the position in the epoch is counted in this run's steps, so it is not where the saved run was.",
            folder,
            settings["batch"],
            saved["batch"],
        )


# ---- the tools' state file, `hf_gradtools_state.json` ----
#
# The state of the gradient tools that a checkpoint must carry beside the optimizer's, in one small JSON file.
#
# `checkpoint-N/hf_gradtools_state.json` holds the gradual-unfreezing position (`GradualUnfreezer.state_dict`) and
# the noise-scale moving averages (`GradientNoiseScale.state_dict`), each only when it is in use:
#
#     {"unfreezer": {"position": 2, "every_n_steps": 100, "labels": ["layer.1", "layer.0", "embeddings"]},
#      "noise_scale": {"beta": 0.95, "grad_sq_norm_ema": 0.012, "trace_cov_ema": 0.9, "steps": 40}}
#
# and the state of the clip algorithm under its name where it keeps one (AutoClip's history:
# `"autoclip": {"history": [...]}`; a registered algorithm's `state_dict()`), the non-finite guard's counts
# (`"nonfinite_guard": {...}`), the spike guard's history (`"spike_guard"`), automatic freezing's norm sums and frozen
# blocks (`"auto_freeze"`), and each component of your own under its `name`.
#
# Written atomically (`atomic.py`) by the process that saves; read by every process when resuming, as untrusted
# input: each entry is checked by its component's `check_state` (`state_checks()`: `COMPONENT_CHECKS` and the clip
# algorithms', `clipping.clip_state_checks`), and a file that is not JSON, holds
# an unknown entry or a field of the wrong type or range is refused with one `DamagedCheckpointError` naming the file
# and the field (`autoclip.history[3]`); so is a per-step record longer than the checkpoint's `global_step` (its
# `trainer_state.json`), e.g. an AutoClip history of 7 norms at step 2. `GradTrainer` reads it before a resume deletes
# or loads anything.

TRAINING_STATE_FILE = "hf_gradtools_state.json"

# The entries of the components other than the clip algorithm, and the check of each (raising `StateFieldError`
# naming the field). A clip algorithm's entry is under its registered name (`clipping.registry.RESERVED_NAMES` keeps
# these names free of them).
COMPONENT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "unfreezer": GradualUnfreezer.check_state,
    "noise_scale": GradientNoiseScale.check_state,
    "nonfinite_guard": NonFiniteGuard.check_state,
    "spike_guard": SkipSpikes.check_state,
    "auto_freeze": AutoFreeze.check_state,
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
    unknown = sorted(key for key in fields.state if key not in checks) if isinstance(fields.state, dict) else []
    fields.check(
        not unknown,
        unknown[0] if unknown else "",
        "is the state of a component this run does not have (the run that saved it had one of that `name`, added "
        "with `trainer.add_component`): add the same component before resuming, or start without this checkpoint. "
        f"This run's entries: {', '.join(sorted(checks))}",
    )
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


# The setting that turns each built-in component on, for the message when a checkpoint holds its entry and the
# resuming run does not use it (a clip algorithm's entry is under its own name: `clip_algorithm`).
COMPONENT_SETTINGS = {
    "unfreezer": "gradual_unfreeze_steps",
    "noise_scale": "log_grad_noise_scale",
    "nonfinite_guard": "skip_nonfinite_grads",
    "spike_guard": "skip_spike_steps",
    "auto_freeze": "auto_freeze",
}


def check_state_components(folder: str | os.PathLike, state: dict, running: set[str]) -> None:
    """Refuse to resume without automatic freezing from a checkpoint whose automatic freezing had frozen blocks
    (they would train again, with no optimizer state); say which other saved entries this run (its components'
    names, `running`) does not use, and so does not load.

    Raises:
        ChangedSettingsError: the `auto_freeze` entry has frozen blocks and `auto_freeze` is off now.
    """
    frozen = state.get("auto_freeze") or {}
    if "auto_freeze" not in running and (frozen.get("frozen") or frozen.get("froze_embeddings")):
        blocks = ", ".join(
            ["embeddings"] * bool(frozen.get("froze_embeddings")) + [f"layer.{i}" for i in frozen["frozen"]]
        )
        raise ChangedSettingsError(
            f"Cannot resume from {os.fspath(folder)}: it was saved with `auto_freeze`=True, which had frozen "
            f"{blocks}, and this run has `auto_freeze`=False, so they would train again. Its optimizer state "
            "covers only the parameters trainable then. Resume with `auto_freeze`=True, or start a new run from "
            "its weights (load the model from the folder, no `resume_from_checkpoint`)."
        )
    unused = sorted(key for key in state if key not in running)
    if unused:
        logger.warning(
            "hf_gradtools: %s holds the state of %s, which this run does not use (set by %s, off or other now): it "
            "is not loaded, and the run goes on without it.",
            os.fspath(folder),
            ", ".join(f"`{key}`" for key in unused),
            ", ".join(f"`{COMPONENT_SETTINGS.get(key, 'clip_algorithm')}`" for key in unused),
        )


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
