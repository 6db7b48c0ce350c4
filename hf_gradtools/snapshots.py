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
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn
from transformers import TrainerCallback

from .atomic import write_json_atomic
from .clipping import ClipResult, check_norm_type, grad_norms, total_norm
from .grad_tensors import TENSOR_SUFFIX, GradTensorCopy, GradTensors, load_grad_tensors
from .layout import model_layout
from .run_folder import (
    MAX_COUNT,
    SNAPSHOT_DIR,
    OutsideRunFolderError,
    fits_float,
    inside_run_folder,
    is_count,
    locate_snapshots,
    read_run_file,
)
from .settings import GradSettings
from .state_fields import shown

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


class GradSnapshotCallback(TrainerCallback):
    """Writes `frozen_parameters.json` at train begin and a gradient snapshot every `every_n_steps` steps.

    `GradTrainer` adds it by itself and hands it the norms it computes while clipping (no extra work). On a plain
    `Trainer` it measures the accumulated gradient with post-accumulate-grad hooks, registered only for the
    steps it records. Hooks see each process's local gradient, so under DDP, or with fp16 loss scaling, on a plain
    `Trainer`, use `GradTrainer` to record the reduced, unscaled gradient.

    Several callbacks on one trainer (say L2 every step and L1 every 2 steps) each need their own `name`: the
    snapshots of a named callback go to `grad_snapshots_<name>/`. Two callbacks that would write the same folder
    are refused at train begin, before any step.

    Args:
        every_n_steps: snapshot period in optimizer steps; default `args.grad_snapshot_steps` (0: none).
        norm_type: norm of the snapshots; default `args.clip_norm_type`, else 2.
        name: letters, digits, `-` and `_`; the snapshot folder becomes `grad_snapshots_<name>`.
        total_limit: keep only the newest N snapshots of this callback's folder, pruned on the writer thread after
            each write (`prune_grad_snapshots`); default `args.grad_snapshot_total_limit` (None: keep all).
    """

    # The snapshot folder, links resolved -> `(id of the TrainerState of the run, callback)`: who writes where.
    _claims: dict[str, tuple[int, int]] = {}

    def __init__(
        self,
        every_n_steps: int | None = None,
        norm_type: float | None = None,
        name: str | None = None,
        total_limit: int | None = None,
    ):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 0):
            raise ValueError(f"`every_n_steps` must be a non-negative integer or None, got {every_n_steps!r}.")
        if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name)):
            raise ValueError(f"`name` must be letters, digits, '-' and '_' (or None), got {name!r}.")
        self.every_n_steps = every_n_steps
        self.norm_type = norm_type
        self.name = name
        if total_limit is not None and (
            isinstance(total_limit, bool) or not isinstance(total_limit, int) or total_limit < 1
        ):
            raise ValueError(f"`total_limit` must be a positive integer or None (keep all), got {total_limit!r}.")
        self.total_limit = total_limit
        # Set by GradTrainer, which then calls `record` from its clipping step.
        self.fed_by_trainer = False
        self._hooks: list = []
        self._hook_norms: dict[int, torch.Tensor] = {}
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._description: dict | None = None  # this run's `frozen_parameters.json`, for `record_no_grad`
        self._run_settings: GradSettings | None = None  # resolved at train begin, not again at every step

    def _settings(self, args) -> GradSettings:
        """The run's settings: given by GradTrainer, else resolved from `args` once per run."""
        if isinstance(args, GradSettings):
            return args
        if self._run_settings is None or self._run_settings.args is not args:
            self._run_settings = GradSettings.from_args(args)
        return self._run_settings

    def period(self, args) -> int:
        return self.every_n_steps if self.every_n_steps is not None else self._settings(args).grad_snapshot_steps

    def norm(self, args) -> float:
        return float(self.norm_type if self.norm_type is not None else self._settings(args).clip_norm_type)

    def is_due(self, args, state) -> bool:
        """Whether the optimizer step now in progress (producing `global_step + 1`) is recorded."""
        period = self.period(args)
        return period > 0 and (state.global_step + 1) % period == 0

    def limit(self, args) -> int | None:
        """How many snapshots this callback keeps (None: all)."""
        if self.total_limit is not None:
            return self.total_limit
        return self._settings(args).grad_snapshot_total_limit

    @property
    def folder(self) -> str:
        """The snapshot folder's name inside `output_dir`."""
        return SNAPSHOT_DIR if self.name is None else f"{SNAPSHOT_DIR}_{self.name}"

    def _claim_folder(self, args, state) -> None:
        """Refuse, before any step, a snapshot folder that another callback of this run writes (also through a
        link inside the run folder), or that is not a folder, or that leads out of `output_dir`."""
        path = os.path.join(args.output_dir, self.folder)
        if self.period(args) > 0:
            inside_run_folder(args.output_dir, path)  # once per run: the writes then go to this folder
            if os.path.lexists(path) and not os.path.isdir(path):
                raise NotADirectoryError(f"The gradient snapshot folder {path!r} is a file, not a folder.")
        key = os.path.realpath(path)
        holder = self._claims.get(key)
        if holder is not None and holder[0] == id(state) and holder[1] != id(self):
            raise ValueError(
                f"Two GradSnapshotCallbacks would write the same snapshots to {self.folder!r}. Give each a "
                "distinct `name`, e.g. GradSnapshotCallback(every_n_steps=2, norm_type=1, name='l1')."
            )
        self._claims[key] = (id(state), id(self))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._run_settings = None  # a field changed between runs is read (and checked) again
        self._remove_hooks()
        self._claim_folder(args, state)
        if not self.fed_by_trainer and self.period(args) > 0:
            _refuse_sharding_engines(args)
        if model is None or not state.is_world_process_zero:
            return
        description = describe_parameters(model)
        self._description = description
        if 0 < state.max_steps <= state.global_step:
            return  # a finished run, resumed: nothing is trained, and its file (with `no_grad`) stays as it is
        path = os.path.join(args.output_dir, FROZEN_PARAMETERS_FILE)
        write_json_atomic(path, description, inside=args.output_dir)
        logger.info("hf_gradtools %s", summary_line(description))

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.fed_by_trainer or model is None or not self.is_due(args, state):
            return
        self._remove_hooks()  # left over by a step that raised
        norm_type = self.norm(args)

        def remember(param: torch.Tensor) -> None:
            self._hook_norms[id(param)] = torch.linalg.vector_norm(param.grad.detach(), norm_type)

        self._hooks = [p.register_post_accumulate_grad_hook(remember) for p in model.parameters() if p.requires_grad]

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._hook_norms = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self._hooks:
            return
        hooks = self._hooks
        self._hooks = []
        for hook in hooks:
            hook.remove()
        named = [(n, p) for n, p in model.named_parameters() if id(p) in self._hook_norms]
        norm_type = self.norm(args)
        pre = torch.stack([self._hook_norms[id(p)].float() for _, p in named]) if named else torch.zeros(0)
        post = total_norm(grad_norms([p.grad for _, p in named], norm_type), norm_type)
        self._hook_norms = {}
        self.record(args, state, [n for n, _ in named], ClipResult(pre, total_norm(pre, norm_type), post))

    def record(
        self,
        args,
        state,
        names: list[str],
        result: ClipResult,
        skipped: bool = False,
        tensors: GradTensorCopy | None = None,
    ) -> None:
        """Queue the snapshot of the optimizer step now in progress; a background thread reads and writes it.

        `result` must hold tensors that nothing modifies later (`clip_gradients` returns fresh ones). `skipped`
        marks a step skipped for non-finite gradients (`"skipped": true` in the file); `tensors`, copies of chosen
        gradients (`GradTensorSaver.copy`), are written beside the JSON as `step-XXXXXXXX.safetensors`.
        """
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, self.folder)
        step = state.global_step + 1
        path = os.path.join(folder, f"step-{step:08d}.json")
        self._submit(_write_snapshot, path, step, self.norm(args), names, result, self.limit(args), skipped, tensors)

    def record_no_grad(self, args, state, names: list[str]) -> None:
        """Add `no_grad` (trainable parameters that received no gradient) to this run's `frozen_parameters.json`."""
        if not state.is_world_process_zero or self._description is None:
            return
        self._description = {**self._description, "no_grad": list(names)}
        self._submit(write_json_atomic, os.path.join(args.output_dir, FROZEN_PARAMETERS_FILE), self._description)

    def _submit(self, write, *write_args) -> None:
        self._raise_failed_writes()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grad-snapshots")
        self._pending.append(self._writer.submit(write, *write_args))

    def flush(self) -> None:
        """Wait for every queued snapshot to be written; re-raise the first error of the writer thread."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _raise_failed_writes(self) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()

    def close(self) -> None:
        """Remove any gradient hook, write every queued snapshot and stop the writer thread (errors re-raised)."""
        self._remove_hooks()
        try:
            self.flush()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def on_save(self, args, state, control, **kwargs):
        self.flush()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()


def _refuse_sharding_engines(args) -> None:
    """Gradient hooks see one process's shard under DeepSpeed ZeRO and FSDP: refuse, rather than record wrong norms."""
    engine = "DeepSpeed" if getattr(args, "deepspeed", None) else "FSDP" if getattr(args, "fsdp", None) else None
    if engine:
        raise ValueError(
            f"GradSnapshotCallback on a plain Trainer cannot record gradient norms under {engine}: its gradient "
            "hooks see each process's shard, not the whole gradient. Use GradTrainer (with FSDP2), or train "
            f"without {engine}."
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


class DamagedSnapshotError(ValueError):
    """A `step-*.json` file in the snapshot folder is not a readable snapshot (raised with `strict=True`)."""


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
