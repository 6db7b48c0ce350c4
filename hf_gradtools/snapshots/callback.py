"""`GradSnapshotCallback`: records the frozen parameters and, every N optimizer steps, each gradient's norm.

It works on any `Trainer` (measuring with gradient hooks) and is fed the norms by `GradTrainer` (which measures
them once per optimizer step, before clipping). The files it writes are described in `files.py`; on a plain
`Trainer`: `Trainer(model, args, train_dataset=ds, callbacks=[GradSnapshotCallback(every_n_steps=10)])`.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from transformers import TrainerCallback

from ..atomic import write_json_atomic
from ..clipping import ClipResult, grad_norms, total_norm
from ..run_folder import SNAPSHOT_DIR, inside_run_folder, read_run_json
from ..settings import GradSettings
from .files import FROZEN_PARAMETERS_FILE, _write_snapshot, describe_parameters, snapshot_steps, summary_line
from .tensors import GradTensorCopy

logger = logging.getLogger(__name__)


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

    # The snapshot folder, links resolved -> weak references to `(the TrainerState of the run, the callback)`.
    _claims: dict[str, tuple[weakref.ref, weakref.ref]] = {}

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
        holder = self._claims.get(key)  # weak references: an id is reused once its object is collected
        if holder is not None and holder[0]() is state and holder[1]() not in (None, self):
            raise ValueError(
                f"Two GradSnapshotCallbacks would write the same snapshots to {self.folder!r}. Give each a "
                "distinct `name`, e.g. GradSnapshotCallback(every_n_steps=2, norm_type=1, name='l1')."
            )
        self._claims[key] = (weakref.ref(state), weakref.ref(self))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._run_settings = None  # a field changed between runs is read (and checked) again
        self._remove_hooks()
        self._claim_folder(args, state)
        if not self.fed_by_trainer and self.period(args) > 0:
            _refuse_sharding_engines(args)
        if model is None or not state.is_world_process_zero:
            return
        self._warn_earlier_snapshots(args, state)
        description = describe_parameters(model)
        self._description = description
        if 0 < state.max_steps <= state.global_step:
            return  # a finished run, resumed: nothing is trained, and its file (with `no_grad`) stays as it is
        path = os.path.join(args.output_dir, FROZEN_PARAMETERS_FILE)
        write_json_atomic(path, description, inside=args.output_dir)
        logger.info("hf_gradtools %s", summary_line(description))

    def _warn_earlier_snapshots(self, args, state) -> None:
        """One warning when a run that starts afresh finds snapshots of an earlier run in its folder: its own are
        written beside them (replacing those of the same steps), and the folder would read as one run."""
        if self.period(args) <= 0:
            return
        folder = inside_run_folder(args.output_dir, os.path.join(args.output_dir, self.folder))
        steps = snapshot_steps(folder)
        if state.global_step > 0:  # resumed: the snapshots after its checkpoint were discarded, the rest are its own
            self._warn_changed_norm(folder, [s for s in steps if s <= state.global_step], self.norm(args))
            return
        if steps:
            logger.warning(
                "hf_gradtools: %s holds %d gradient snapshot(s) of an earlier run (steps %d to %d); this run writes "
                "its own beside them, replacing those of the same steps, and the folder would read as one run. "
                "Empty the folder or use another `output_dir` to keep the runs apart.",
                folder,
                len(steps),
                steps[0],
                steps[-1],
            )

    @staticmethod
    def _warn_changed_norm(folder: str, steps: list[int], norm_type: float) -> None:
        """One warning when the run resumes with another norm type than its last snapshot's: the series mixes them."""
        if not steps:
            return
        try:
            earlier = read_run_json(folder, os.path.join(folder, f"step-{steps[-1]:08d}.json")).get("norm_type")
        except (OSError, ValueError, AttributeError):
            return  # an unreadable snapshot: reading the series says so
        if isinstance(earlier, (int, float)) and float(earlier) != norm_type:
            logger.warning(
                "hf_gradtools: the gradient snapshots up to step %d are in norm type %g and this resumed run takes "
                "its own in norm type %g: the series in %s mixes the two (a plot draws them as one).",
                steps[-1],
                earlier,
                norm_type,
                folder,
            )

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

    def rewrite_record(self, args, record: dict) -> None:
        """Queue `record` as this run's `frozen_parameters.json` (the frozen state changed, e.g. by automatic
        freezing), keeping the `no_grad` list already recorded; in order with the other writes of this callback."""
        no_grad = {"no_grad": self._description["no_grad"]} if "no_grad" in (self._description or {}) else {}
        self._description = {**record, **no_grad}
        self._submit(write_json_atomic, os.path.join(args.output_dir, FROZEN_PARAMETERS_FILE), self._description)

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


def close_snapshot_callbacks(callbacks: list[GradSnapshotCallback]) -> None:
    """Flush and stop every snapshot writer; an error is raised unless another one is already on its way.

    Every writer is closed even when closing one is interrupted (`TrainingTerminated` from a SIGTERM): the
    interruption is raised after the last one.
    """
    errors, interrupted = [], None
    for callback in callbacks:
        try:
            callback.close()
        except Exception as error:  # noqa: PERF203
            errors.append(error)
        except BaseException as stop:
            interrupted = interrupted or stop
    if interrupted is not None:
        raise interrupted
    if errors:
        if sys.exc_info()[0] is None:
            raise errors[0]
        for error in errors:
            logger.error("hf_gradtools: a gradient snapshot could not be written: %s", error)
