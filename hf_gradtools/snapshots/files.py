"""Record which parameters are frozen and what their gradients looked like, to files in `output_dir`.

On disk, in the run's `output_dir`:

- `frozen_parameters.json`: `{"frozen": [names], "trainable": [names], "num_frozen": elements,
  "num_trainable": elements, "layer_stack": module name or null, "embeddings": [module names]}`.
- `grad_snapshots/step-00000010.json`, one file per snapshot: `{"step", "norm_type", "total_norm_pre_clip",
  "total_norm_post_clip", "norms": {parameter name: norm}}`. `step` is the `global_step` that optimizer step
  produced; norms are of the accumulated gradient before clipping, in the norm type used for clipping.

Every file is written atomically (temporary file, then rename), by the main process only, on a background
thread: reading the norms back from the device and writing them never holds up the training step. Pending writes
are finished before each checkpoint of `GradTrainer` is saved (after it, on `on_save`, on a plain `Trainer`), at
the end of training, and on SIGTERM (`signals.py`).

Example (a training run; the examples of `load_grad_snapshots` and `prune_grad_snapshots` run on files alone):
    >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[GradSnapshotCallback(every_n_steps=10)])
    ... # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> snapshots = load_grad_snapshots(args.output_dir)  # doctest: +SKIP
    >>> snapshots[0]["step"], snapshots[0]["total_norm_pre_clip"]  # doctest: +SKIP
    (10, 0.83)
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import re

import torch
from torch import nn

from ..atomic import write_json_atomic
from ..clipping import ClipResult, check_norm_type
from ..errors import DamagedSnapshotError
from ..layout import model_layout
from ..run_folder import (
    MAX_COUNT,
    SNAPSHOT_DIR,
    OutsideRunFolderError,
    fits_float,
    is_count,
    locate_snapshots,
    read_run_file,
)
from ..state_fields import shown
from .tensors import TENSOR_SUFFIX, GradTensorCopy, GradTensors, load_grad_tensors

logger = logging.getLogger(__name__)

FROZEN_PARAMETERS_FILE = "frozen_parameters.json"


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) and value > 0 else value


def describe_parameters(model: nn.Module) -> dict:
    """The content of `frozen_parameters.json` for `model`."""
    frozen, trainable, num_frozen, num_trainable = [], [], 0, 0
    for name, param in model.named_parameters():
        if param.requires_grad:
            trainable.append(name)
            num_trainable += param.numel()
        else:
            frozen.append(name)
            num_frozen += param.numel()
    tied = tied_parameter_names(model)
    stack, embeddings = model_layout(model)
    return {
        "frozen": frozen,
        "trainable": trainable,
        "num_frozen": num_frozen,
        "num_trainable": num_trainable,
        "layer_stack": stack,
        "embeddings": embeddings,
        # Tied names (e.g. `lm_head.weight` tied to the input embeddings): the same tensor as the listed name.
        "tied": tied,
        "frozen_tied": [alias for alias, name in tied.items() if name in set(frozen)],
    }


def tied_parameter_names(model: nn.Module) -> dict[str, str]:
    """`{alias: name}` for every parameter reachable under a second name (tied weights), in module order."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def summary_line(description: dict) -> str:
    """One line: how many tensors and elements are frozen and trainable."""
    total = description["num_frozen"] + description["num_trainable"]
    share = 100.0 * description["num_trainable"] / total if total else 0.0
    return (
        f"frozen: {len(description['frozen'])} tensors, {description['num_frozen']:,} elements; "
        f"trainable: {len(description['trainable'])} tensors, {description['num_trainable']:,} elements "
        f"({share:.1f}% of {total:,})"
    )


def _write_snapshot(
    path: str,
    step: int,
    norm_type: float,
    names: list[str],
    result: ClipResult,
    keep: int | None = None,
    skipped: bool = False,
    tensors: GradTensorCopy | None = None,
) -> None:
    """Write one snapshot (its tensors first, then its JSON); then, when it was written and `keep` is set, prune its
    folder to the newest `keep`. When the JSON cannot be written (a full disk), the tensor file is removed too: a
    snapshot is its JSON, and tensors without one would be an orphan that no resume replaces."""
    values = torch.cat(
        [result.param_norms.float().flatten(), torch.stack([result.total_norm, result.total_norm_post_clip]).float()]
    ).tolist()
    *norms, pre, post = values
    snapshot = {
        "step": step,
        "norm_type": _json_float(norm_type),
        "total_norm_pre_clip": pre,
        "total_norm_post_clip": post,
        "norms": dict(zip(names, norms, strict=True)),
    }
    if skipped:
        snapshot["skipped"] = True
    tensor_file = path[: -len(".json")] + TENSOR_SUFFIX
    if tensors is not None:
        tensors.write(tensor_file)
    try:
        write_json_atomic(path, snapshot)
    except BaseException:
        if tensors is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tensor_file)
        raise
    if keep is not None:
        prune_grad_snapshots(os.path.dirname(path), keep, variant="")


class GradSnapshots(list):
    """The snapshots `load_grad_snapshots` read, in step order (a plain `list` of dicts), plus what it skipped.

    Attributes:
        skipped: `{file path: reason}` for each `step-*.json` file that could not be read as a snapshot.
        folder: the snapshot folder they were read from.
    """

    def __init__(self, snapshots=(), skipped: dict[str, str] | None = None, folder: str | None = None):
        super().__init__(snapshots)
        self.skipped: dict[str, str] = dict(skipped or {})
        self.folder = folder

    def tensors(self, step: int) -> GradTensors:
        """The gradient tensors saved with the snapshot of `step` (`grad_snapshot_tensors`), each read from the
        file only when looked up. Raises `FileNotFoundError` listing the steps that have tensors."""
        return load_grad_tensors(self.folder, step=step)


def snapshot_folder(path: str | os.PathLike) -> str:
    """The snapshot folder of `path`: its `grad_snapshots/` sub-folder when it has one, else `path` itself.

    Raises:
        OutsideRunFolderError: that folder is a link out of the run folder (`run_folder.locate_snapshots`).
    """
    return locate_snapshots(path)[1]


_NORM_WORDS = "a non-negative number, or NaN / Infinity for a step whose gradient was not finite"


def is_norm(value) -> bool:
    """Whether a value read from a snapshot is a norm `_write_snapshot` can write: a non-negative number that
    converts to a float, or NaN or +inf (the norm of a non-finite gradient, e.g. of a skipped step)."""
    return fits_float(value) and (value >= 0 or math.isnan(value))


def _read_snapshot(file: str, run_folder: str) -> dict:
    """One snapshot file of `run_folder` as a dict; `ValueError` (or `OSError`) saying why when it is not one (a
    link out of the run folder is not read)."""
    try:
        text = read_run_file(run_folder, file).decode("utf-8")
    except OutsideRunFolderError as e:
        raise ValueError(f"a link out of the run folder, to {os.path.realpath(file)!r}: not read") from e
    if not text.strip():
        raise ValueError("empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}; truncated?)") from None
    if not isinstance(data, dict):
        raise ValueError(f"not a snapshot: a JSON {type(data).__name__}, not an object")
    step = data.get("step")
    if not is_count(step):
        raise ValueError(
            f"not a snapshot: `step` is {shown(step)}, not a step number (an integer from 0 to {MAX_COUNT})"
        )
    norms = data.get("norms")
    if not isinstance(norms, dict):
        raise ValueError("not a snapshot: no `norms` object")
    bad = next((name for name, value in norms.items() if not is_norm(value)), None)
    if bad is not None:
        raise ValueError(f"not a snapshot: the norm of {bad!r} is {shown(norms[bad])}, not a norm ({_NORM_WORDS})")
    for key in ("total_norm_pre_clip", "total_norm_post_clip"):
        if key in data and not is_norm(data[key]):
            raise ValueError(f"not a snapshot: `{key}` is {shown(data[key])}, not a norm ({_NORM_WORDS})")
    if "norm_type" in data:
        try:
            check_norm_type(data["norm_type"], "norm_type")
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"not a snapshot: `norm_type` is {shown(data['norm_type'])}") from None
    return data


def load_grad_snapshots(path: str | os.PathLike, strict: bool = False) -> GradSnapshots:
    """Load the snapshots of a run, in step order, from its `output_dir` or its `grad_snapshots` folder.

    Each is a dict with `step`, `norm_type`, `norms` (`{parameter name: float}`), `total_norm_pre_clip` and
    `total_norm_post_clip`. A `step-*.json` file that is empty, truncated, not JSON or not a snapshot (no integer
    `step`, no `norms` object of numbers, a total norm or `norm_type` that is not one), or a link out of the run
    folder (not read), is skipped with one warning that names every such file, and listed in the result's
    `skipped` attribute (`{path: reason}`); with `strict=True` it raises `DamagedSnapshotError` instead. Temporary
    files of interrupted writes (`.step-*.tmp`) and other files are not looked at.
    Gradient tensors saved with a snapshot (`grad_snapshot_tensors`) are opened with `snapshots.tensors(step)`,
    which reads each tensor from its file only when it is looked up.

    Raises:
        FileNotFoundError: the folder does not exist.
        OutsideRunFolderError: the snapshot folder is a link out of the run folder (`run_folder.py`).
        DamagedSnapshotError: with `strict=True`, when a snapshot file cannot be read.

    Example:
        >>> from pathlib import Path
        >>> from hf_gradtools.atomic import write_json_atomic
        >>> for step in (5, 10):
        ...     write_json_atomic(f"out/grad_snapshots/step-{step:08d}.json", {"step": step, "norm_type": 2.0,
        ...         "total_norm_pre_clip": 0.5, "total_norm_post_clip": 0.5, "norms": {"classifier.bias": 0.5}})
        >>> Path("out/grad_snapshots/step-00000015.json").touch()  # as a full disk can leave it
        >>> snapshots = load_grad_snapshots("out")
        >>> [s["step"] for s in snapshots], snapshots.skipped
        ([5, 10], {'out/grad_snapshots/step-00000015.json': 'empty file'})
    """
    run, folder = locate_snapshots(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No gradient snapshot folder at {folder!r} (expected `{SNAPSHOT_DIR}/` inside it).")
    snapshots, skipped = [], {}
    for file in sorted(glob.glob(os.path.join(glob.escape(folder), "step-*.json"))):
        try:
            snapshots.append(_read_snapshot(file, run))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            skipped[file] = str(e) if not isinstance(e, UnicodeDecodeError) else "not UTF-8 text"
    if skipped:
        listing = "; ".join(f"{os.path.basename(f)}: {why}" for f, why in skipped.items())
        if strict:
            raise DamagedSnapshotError(f"{len(skipped)} unreadable gradient snapshot file(s) in {folder!r}: {listing}")
        logger.warning("Skipped %d unreadable gradient snapshot file(s) in %r: %s", len(skipped), folder, listing)
    return GradSnapshots(sorted(snapshots, key=lambda s: s["step"]), skipped, folder)


_SNAPSHOT_FILE = re.compile(r"^step-(\d+)(.*)\.(json|safetensors)$")


def _snapshot_files(folder: str, variant: str | None) -> list[tuple[int, str, list[str]]]:
    """`(step, stem, [file names])` of each snapshot in `folder`, oldest first; `[]` when there is no folder.

    Entries that are folders are not snapshot files and are left out."""
    try:
        entries = [entry.name for entry in os.scandir(folder) if not entry.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    stems: dict[str, tuple[int, list[str]]] = {}
    for name in entries:
        match = _SNAPSHOT_FILE.match(name)
        if match is None or (variant is not None and match.group(2) != variant):
            continue
        stem = name[: -len(match.group(3)) - 1]
        stems.setdefault(stem, (int(match.group(1)), []))[1].append(name)
    return sorted((step, stem, sorted(files)) for stem, (step, files) in stems.items())


def snapshot_steps(folder: str | os.PathLike) -> list[int]:
    """The steps of the snapshot files in a snapshot `folder` (not read), oldest first; `[]` when there is none."""
    return sorted({step for step, _, _ in _snapshot_files(os.fspath(folder), None)})


def _remove(folder: str, snapshots: list[tuple[int, str, list[str]]]) -> list[str]:
    """Delete the files of `snapshots` in `folder` (a link is removed itself, its target is not touched)."""
    removed = []
    for _, _, names in snapshots:
        for name in names:
            file = os.path.join(folder, name)
            try:
                os.remove(file)
            except FileNotFoundError:  # removed meanwhile by another caller
                continue
            removed.append(file)
    return removed


def prune_grad_snapshots(path: str | os.PathLike, keep: int | None, variant: str | None = None) -> list[str]:
    """Delete all but the newest `keep` snapshots of a run; return the paths deleted.

    A snapshot is every `step-<N>...json` / `step-<N>...safetensors` file with the same stem (the name without its
    ending), deleted together. Newest means the highest step `N`, then the later name. Nothing else in the folder
    is touched: not other files, not the temporary files of writes in progress. Safe to call again and again and
    from several processes at once (a file already gone is passed over); a missing folder deletes nothing. A
    snapshot folder that is a link out of the run folder is refused (`OutsideRunFolderError`), nothing deleted.

    Args:
        path: the run's `output_dir`, or its `grad_snapshots` folder.
        keep: how many snapshots to keep, at least 1; `None` keeps all.
        variant: count only the snapshots whose name has exactly this between the step number and the ending
            (`""` for `step-00000010.json`), so that snapshot series sharing a folder are pruned one by one;
            `None`: every snapshot in the folder.

    Example:
        >>> from pathlib import Path
        >>> Path("out/grad_snapshots").mkdir(parents=True)
        >>> for name in ["step-00000001.safetensors"] + [f"step-{step:08d}.json" for step in (1, 2, 3, 4)]:
        ...     Path("out/grad_snapshots", name).touch()
        >>> prune_grad_snapshots("out", keep=3)
        ['out/grad_snapshots/step-00000001.json', 'out/grad_snapshots/step-00000001.safetensors']
    """
    if keep is None:
        return []
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"`keep` must be a positive integer or None (keep all), got {keep!r}.")
    folder = snapshot_folder(path)  # refuses a snapshot folder that links out of the run folder
    snapshots = _snapshot_files(folder, variant)
    return _remove(folder, snapshots[: max(len(snapshots) - keep, 0)])


def discard_grad_snapshots_after(path: str | os.PathLike, step: int, variant: str | None = None) -> list[str]:
    """Delete the snapshots of steps after `step`; return the paths deleted.

    For a run resumed from the checkpoint of `step`: the snapshots a killed run wrote after its last checkpoint
    belong to steps the resumed run does again, and would otherwise stay (from the lost run) wherever the resumed
    run does not write the same name. Files are matched as in `prune_grad_snapshots`.

    Raises:
        OutsideRunFolderError: the snapshot folder is a link out of the run folder; nothing is deleted.
    """
    folder = snapshot_folder(path)
    return _remove(folder, [s for s in _snapshot_files(folder, variant) if s[0] > step])


def discard_snapshots_of_lost_steps(output_dir: str, folders, step: int) -> None:
    """Before a run resumes from the checkpoint of `step`: delete the snapshots a lost run wrote after it, in each
    snapshot folder of `output_dir`, so that each step done again ends up with one snapshot, its own."""
    for folder in sorted(folders):
        path = os.path.join(output_dir, folder)
        removed = discard_grad_snapshots_after(path, step)
        if removed:
            logger.info(
                "hf_gradtools: resuming from step %d; deleted the %d snapshot file(s) of later steps in %s.",
                step,
                len(removed),
                path,
            )
