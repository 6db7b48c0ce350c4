"""Per-layer gradient norms over training steps, from a run's snapshots, drawn to a PNG.

Each parameter name of a snapshot goes to one group, using `layer_stack` and `embeddings` from the run's
`frozen_parameters.json`: names under `<layer_stack>.<i>.` go to `"layer.i"`, names under an embeddings module
to `"embeddings"`, everything else (pooler, classifier, final norm) to `"head"`. A group's norm is the norm, in
the snapshot's `norm_type`, of its parameters' norms: the norm of the group's gradient as one vector. Frozen
parameters have no gradient, so a fully frozen group is not drawn.

The figure has two panels over the snapshot steps: the groups' norms (or, with `params`, chosen parameters'
norms), and the total-norm panel: the total norm before and after clipping, the clip coefficient (after / before)
on its right axis, and a red line at each step skipped for non-finite gradients (snapshots with
`"skipped": true`). `plot_grad_histogram` draws the values of one saved gradient tensor (`grad_snapshot_tensors`).
`plot_grad_noise_scale` draws the `grad_noise_scale` that a run with `log_grad_noise_scale` logged, read from the
log history of its `trainer_state.json` (`trainer.save_state()`), to `grad_noise_scale.png`, with a line at the
run's effective batch (`effective_batch`); runs that did not log it get no such figure. Every file of the run is
read, and every PNG written, without following a link out of the run folder (`run_folder.py`).

matplotlib is imported only when drawing (`pip install 'hf_gradtools[plot]'`), with the `Agg` backend.

Example:
    >>> description = {"layer_stack": "bert.encoder.layer", "embeddings": ["bert.embeddings"]}
    >>> snapshot = {"step": 10, "norm_type": 2.0, "norms": {"bert.encoder.layer.1.output.dense.weight": 3.0,
    ...     "bert.encoder.layer.1.output.dense.bias": 4.0, "classifier.weight": 1.0}}
    >>> group_norms(snapshot, description)
    {'layer.1': 5.0, 'head': 1.0}

    The same as a run's files, drawn:
    >>> from hf_gradtools.atomic import write_json_atomic
    >>> description.update(frozen=[], trainable=list(snapshot["norms"]))
    >>> write_json_atomic("out/frozen_parameters.json", description)
    >>> write_json_atomic("out/grad_snapshots/step-00000010.json",
    ...     {**snapshot, "total_norm_pre_clip": 5.1, "total_norm_post_clip": 1.0})
    >>> plot_grad_norms("out")
    'out/grad_norms.png'
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .atomic import write_file_atomic
from .clipping import check_norm_type
from .layout import EMBEDDINGS, HEAD, parameter_group
from .layout import group_order as _group_order
from .patterns import example_names, match_names
from .run_folder import (
    MAX_COUNT,
    UnreadableRunFileError,
    fits_float,
    is_count,
    read_run_json,
    training_args_fields,
)
from .snapshots import FROZEN_PARAMETERS_FILE, SNAPSHOT_DIR, load_grad_snapshots
from .snapshots.tensors import grad_tensor_files, load_grad_tensors
from .state_fields import shown

PLOT_FILE = "grad_norms.png"
NOISE_PLOT_FILE = "grad_noise_scale.png"
TRAINER_STATE_FILE = "trainer_state.json"
NOISE_SCALE_KEY = "grad_noise_scale"
TOTAL_KEYS = ("total_norm_pre_clip", "total_norm_post_clip")


def run_folder_of(path: str | os.PathLike) -> str:
    """The run folder of `path`: a run's `output_dir`, or its `grad_snapshots` folder."""
    folder = os.fspath(path).rstrip(os.sep) or os.sep
    if os.path.basename(folder) == SNAPSHOT_DIR and not os.path.isdir(os.path.join(folder, SNAPSHOT_DIR)):
        folder = os.path.dirname(folder) or "."
    return folder


def check_description(description, path: str, counts: bool = False) -> dict:
    """`description` when it is the content of a `frozen_parameters.json` (`snapshots.describe_parameters`); with
    `counts`, also holding `num_frozen` and `num_trainable`.

    Raises:
        UnreadableRunFileError: it is not; the message names `path` and the field.
    """

    def problem() -> str | None:
        if not isinstance(description, dict):
            return f"a JSON {type(description).__name__}, not an object"
        for key in ("frozen", "trainable", "embeddings"):
            names = description.get(key)
            if key == "embeddings" and names is None:
                continue
            if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
                return f"`{key}` is {names!r}, not a list of names"
        for key in ("num_frozen", "num_trainable") if counts else ():
            count = description.get(key)
            if not is_count(count):
                return f"`{key}` is {shown(count)}, not a count of elements (an integer from 0 to {MAX_COUNT})"
        stack = description.get("layer_stack")
        if stack is not None and not isinstance(stack, str):
            return f"`layer_stack` is {stack!r}, not a module name"
        return None

    found = problem()
    if found is not None:
        raise UnreadableRunFileError(f"{path!r} is not a record of frozen parameters: {found}.")
    return description


def load_run(output_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """Read a run's `frozen_parameters.json` and its snapshots (in step order).

    `output_dir` is the run's `output_dir`, or its `grad_snapshots` folder. Nothing is read through a link that
    leaves the run folder (`run_folder.py`).

    Raises:
        FileNotFoundError: the folder, `frozen_parameters.json` or every snapshot is missing.
        ValueError: `frozen_parameters.json` is not valid JSON or not such a record (the message names the file and
            the field), or a file leads out of the run folder (`OutsideRunFolderError`).
    """
    folder = run_folder_of(output_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder; give the `output_dir` of a GradTrainer run.")
    path = os.path.join(folder, FROZEN_PARAMETERS_FILE)
    if not os.path.lexists(path):
        raise FileNotFoundError(
            f"No {FROZEN_PARAMETERS_FILE} in {folder!r}: GradTrainer writes it, and gradient snapshots, only when "
            "something is frozen or `grad_snapshot_steps` > 0 (e.g. --grad_snapshot_steps 10); otherwise this is "
            "not the `output_dir` of a GradTrainer run, or its training did not start."
        )
    description = check_description(read_run_json(folder, path), path)
    snapshots = load_grad_snapshots(folder) if os.path.lexists(os.path.join(folder, SNAPSHOT_DIR)) else []
    if not snapshots:
        raise FileNotFoundError(
            f"No gradient snapshot in {os.path.join(folder, SNAPSHOT_DIR)!r}: train with `grad_snapshot_steps` > 0 "
            "(e.g. --grad_snapshot_steps 10) for at least that many optimizer steps."
        )
    missing = [(s["step"], key) for s in snapshots for key in TOTAL_KEYS if key not in s]
    if missing:
        step, key = missing[0]
        raise UnreadableRunFileError(
            f"The snapshot of step {step} in {os.path.join(folder, SNAPSHOT_DIR)!r} has no `{key}`: it was not "
            "written by GradSnapshotCallback."
        )
    return description, snapshots


def combine_norms(norms: Iterable[float], norm_type: float | str) -> float:
    """The `norm_type` norm of a list of norms: `(sum n**p) ** (1/p)`, or the largest for `inf`.

    Example:
        >>> combine_norms([3.0, 4.0], 2), combine_norms([3.0, 4.0], "inf")
        (5.0, 4.0)
    """
    p = check_norm_type(norm_type, "norm_type")
    values = [float(v) for v in norms]
    if not values:
        return 0.0
    if math.isinf(p):
        return max(values)
    top = max(values)
    if top == 0.0 or not math.isfinite(top):
        return top
    # Divide by the largest norm first so that large p does not overflow.
    return top * sum((v / top) ** p for v in values) ** (1.0 / p)


def frozen_groups(description: dict) -> list[str]:
    """The groups whose every parameter is frozen, in plot order (e.g. `["embeddings", "layer.0"]`).

    Example:
        >>> frozen_groups({"layer_stack": "enc.layer", "embeddings": ["emb"],
        ...     "frozen": ["emb.word.weight", "enc.layer.0.w"], "trainable": ["enc.layer.1.w", "head.w"]})
        ['embeddings', 'layer.0']
    """
    layer_stack, embeddings = description.get("layer_stack"), description.get("embeddings") or []
    frozen: dict[str, bool] = {}
    for name in description.get("frozen", []):
        frozen.setdefault(parameter_group(name, layer_stack, embeddings), True)
    for name in description.get("trainable", []):
        frozen[parameter_group(name, layer_stack, embeddings)] = False
    return sorted((group for group, is_frozen in frozen.items() if is_frozen), key=_group_order)


def group_norms(snapshot: dict, description: dict) -> dict[str, float]:
    """Norm of each parameter group in one snapshot, ordered embeddings, layer.0, layer.1, ..., head.

    Args:
        snapshot: one item of `load_grad_snapshots` (`norms`, `norm_type`).
        description: the content of `frozen_parameters.json` (`layer_stack`, `embeddings`).
    """
    layer_stack = description.get("layer_stack")
    embeddings = description.get("embeddings") or []
    members: dict[str, list[float]] = {}
    for name, norm in snapshot["norms"].items():
        members.setdefault(parameter_group(name, layer_stack, embeddings), []).append(norm)
    norm_type = snapshot.get("norm_type", 2.0)
    return {group: combine_norms(members[group], norm_type) for group in sorted(members, key=_group_order)}


def group_norm_series(snapshots: list[dict], description: dict) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and, per group, its norm at each step (`nan` where a snapshot lacks the group).

    Example:
        >>> steps, series = group_norm_series([{"step": 5, "norm_type": 2.0, "norms": {"w": 2.0}}], {})
        >>> steps, series
        ([5], {'head': [2.0]})
    """
    per_step = [group_norms(snapshot, description) for snapshot in snapshots]
    groups = sorted({group for norms in per_step for group in norms}, key=_group_order)
    series = {group: [norms.get(group, math.nan) for norms in per_step] for group in groups}
    return [int(snapshot["step"]) for snapshot in snapshots], series


def _norm_label(norm_type: float | str) -> str:
    p = check_norm_type(norm_type, "norm_type")
    if math.isinf(p):
        return "L-inf"
    return f"L{int(p)}" if p == int(p) else f"L{p:g}"


def param_norm_series(snapshots: list[dict], patterns: Sequence[str]) -> dict[str, list[float]]:
    """Per parameter whose name a pattern matches (`re.search`), its norm at each snapshot (`nan` where absent).

    Raises:
        ValueError: a pattern matches no parameter of any snapshot (the message names `--params`).

    Example:
        >>> param_norm_series([{"norms": {"a.weight": 1.0, "b.weight": 2.0}}, {"norms": {"a.weight": 3.0}}], ["^a"])
        {'a.weight': [1.0, 3.0]}
    """
    names = list(dict.fromkeys(name for snapshot in snapshots for name in snapshot["norms"]))
    chosen = match_names(names, patterns, field="--params")
    return {name: [float(s["norms"].get(name, math.nan)) for s in snapshots] for name in chosen}


def clip_coefficients(snapshots: list[dict]) -> list[float]:
    """Per snapshot, the factor clipping applied: `total_norm_post_clip / total_norm_pre_clip` (1 for a zero
    gradient, `nan` where either norm is not finite).

    Example:
        >>> clip_coefficients([{"total_norm_pre_clip": 4.0, "total_norm_post_clip": 1.0},
        ...     {"total_norm_pre_clip": 0.0, "total_norm_post_clip": 0.0}])
        [0.25, 1.0]
    """
    coefficients = []
    for snapshot in snapshots:
        pre, post = float(snapshot["total_norm_pre_clip"]), float(snapshot["total_norm_post_clip"])
        if not (math.isfinite(pre) and math.isfinite(post)):
            coefficients.append(math.nan)
        else:
            coefficients.append(post / pre if pre > 0 else 1.0)
    return coefficients


def skipped_steps(snapshots: list[dict]) -> list[int]:
    """Steps of the snapshots marked `"skipped": true` (optimizer steps skipped for non-finite gradients)."""
    return [int(s["step"]) for s in snapshots if s.get("skipped")]


def _pyplot():
    """matplotlib's pyplot with the file-only `Agg` backend, imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) if math.isfinite(float(v)) else math.nan for v in values]


def _use_log_scale(ax, series: Iterable[Iterable[float]]) -> None:
    positive = [v for values in series for v in values if math.isfinite(v) and v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")


def draw_grad_norms(description: dict, snapshots: list[dict], params: Sequence[str] | None = None):
    """The figure of `plot_grad_norms` (a matplotlib `Figure`, two panels sharing the step axis).

    Top: the norm of each group (or, with `params`, of each parameter a pattern matches). Bottom, the total-norm
    panel: the total norm before and after clipping, the clip coefficient (after / before) on its right axis, and
    a red vertical line at every skipped step.
    """
    plt = _pyplot()
    steps = [int(s["step"]) for s in snapshots]
    if params:
        series = param_norm_series(snapshots, params)
    else:
        series = group_norm_series(snapshots, description)[1]
    totals = _finite(s["total_norm_pre_clip"] for s in snapshots)
    clipped = _finite(s["total_norm_post_clip"] for s in snapshots)
    coefficients = clip_coefficients(snapshots)
    skipped = skipped_steps(snapshots)
    norm_type = snapshots[-1].get("norm_type", 2.0)

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 6.4), dpi=120, sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    marker = "o" if len(steps) <= 30 else None
    layers = [group for group in series if group not in (EMBEDDINGS, HEAD)]
    colormap = plt.get_cmap("viridis" if not params else "tab20")
    for i, (label, values) in enumerate(series.items()):
        if params:
            color = colormap(i % 20)
        elif label == EMBEDDINGS:
            color = "tab:red"
        elif label == HEAD:
            color = "tab:orange"
        else:
            color = colormap(layers.index(label) / max(len(layers) - 1, 1) * 0.9)
        top.plot(steps, _finite(values), color=color, marker=marker, markersize=3, linewidth=1.4, label=label)
    _use_log_scale(top, [_finite(v) for v in series.values()])
    top.set_ylabel(f"{_norm_label(norm_type)} norm, before clipping")
    if params:
        title = f"Gradient norm of {len(series)} parameters matching {', '.join(params)}"
    else:
        frozen = ", ".join(frozen_groups(description)) or "none"
        title = f"Gradient norm per layer group over {len(steps)} snapshots (frozen: {frozen})"
    top.set_title(title, fontsize=10)
    if len(series) <= 24:
        top.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)

    bottom.plot(steps, totals, color="black", linestyle="--", linewidth=1.2, label="total, before clipping")
    bottom.plot(steps, clipped, color="gray", linestyle=":", linewidth=1.2, label="total, after clipping")
    _use_log_scale(bottom, [totals, clipped])
    bottom.set_ylabel(f"total {_norm_label(norm_type)} norm")
    coef_axis = bottom.twinx()
    coef_axis.plot(steps, coefficients, color="tab:blue", marker=".", linewidth=0.8, label="clip coefficient")
    coef_axis.set_ylim(0, 1.05)
    coef_axis.set_ylabel("clip coefficient (after / before)", color="tab:blue", fontsize=8)
    for i, step in enumerate(skipped):
        for ax in (top, bottom):
            ax.axvline(step, color="tab:red", linewidth=1.0, alpha=0.7, label="skipped step" if i == 0 else None)
    handles = [h for ax in (bottom, coef_axis) for h in ax.get_legend_handles_labels()[0]]
    bottom.legend(handles=handles, loc="center left", bbox_to_anchor=(1.12, 0.5), fontsize=7, frameon=False)
    bottom.set_xlabel("optimizer step")
    for ax in (top, bottom):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def _save(fig, output: str | os.PathLike | None, run_folder: str, name: str) -> str:
    """Write `fig` as a PNG to `output`, by default to `name` in `run_folder`; atomically, so that a link there is
    replaced, not written through (`atomic.write_file_atomic`)."""
    import matplotlib.pyplot as plt

    path, inside = (os.fspath(output), None) if output is not None else (os.path.join(run_folder, name), run_folder)
    try:
        write_file_atomic(path, lambda tmp: fig.savefig(tmp, format="png"), inside=inside)
    finally:
        plt.close(fig)
    return path


def plot_grad_norms(
    output_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    params: Sequence[str] | None = None,
    run: tuple[dict, list[dict]] | None = None,
) -> str:
    """Draw the gradient norms of the run in `output_dir` over its snapshot steps to a PNG (see `draw_grad_norms`).

    Args:
        output_dir: a run's `output_dir` (with `grad_snapshots/`) or the snapshot folder itself.
        output: the PNG to write; default `<output_dir>/grad_norms.png`.
        params: regex name patterns: draw these parameters instead of the groups.
        run: what `load_run(output_dir)` gave, when already read (default: read it now).

    Returns:
        The path written.

    Raises:
        FileNotFoundError, ValueError: as `load_run`; `ValueError` for a pattern that matches no parameter.
    """
    description, snapshots = load_run(output_dir) if run is None else run
    return _save(draw_grad_norms(description, snapshots, params), output, run_folder_of(output_dir), PLOT_FILE)


def _trainer_state(output_dir: str | os.PathLike) -> dict | None:
    """The run's `trainer_state.json` as a dict, its fields that `plot` uses checked; None when there is none.

    Checked as the Trainer writes them: `train_batch_size` a positive count (or null), `log_history` a list of
    objects, and each entry that logs `grad_noise_scale` at an integer `step` (a count) with a number that converts
    to a float (NaN and infinities are what an average over a zero gradient gives).

    Raises:
        UnreadableRunFileError: the file is damaged or foreign; one line naming it and the field.
    """
    folder = run_folder_of(output_dir)
    path = os.path.join(folder, TRAINER_STATE_FILE)
    if not os.path.lexists(path):
        return None
    state = read_run_json(folder, path)

    def problem() -> str | None:
        if not isinstance(state, dict):
            return f"is not a trainer state: a JSON {type(state).__name__}, not an object"
        batch = state.get("train_batch_size")
        if batch is not None and not is_count(batch, low=1):
            return f"is not a trainer state: `train_batch_size` is {shown(batch)}, not a batch size (1 to {MAX_COUNT})"
        history = state.get("log_history", [])
        if not isinstance(history, list):
            return f"is not a trainer state: `log_history` is {shown(history)}, not a list of log entries"
        for i, entry in enumerate(history):
            if not isinstance(entry, dict):
                return f"is not a trainer state: `log_history[{i}]` is {shown(entry)}, not a log entry (an object)"
            if NOISE_SCALE_KEY in entry and "step" in entry:
                step, value = entry["step"], entry[NOISE_SCALE_KEY]
                if not (fits_float(value) and is_count(step)):
                    return (
                        f"logs {NOISE_SCALE_KEY} {shown(value)} at step {shown(step)}: not a number at an integer step"
                    )
        return None

    found = problem()
    if found is not None:
        raise UnreadableRunFileError(f"{path!r} {found}.")
    return state


def noise_scale_series(output_dir: str | os.PathLike) -> tuple[list[int], list[float]]:
    """Steps and values of `grad_noise_scale` in the log history of the run's `trainer_state.json`.

    Empty lists when the file is missing or no log entry holds the value (a run without `log_grad_noise_scale`).

    Raises:
        ValueError: `trainer_state.json` is not valid JSON, or not a trainer state (`_trainer_state`; the message
            names the file and the field).

    Example:
        >>> from hf_gradtools.atomic import write_json_atomic
        >>> log = [{"step": 5, "grad_noise_scale": 80.2, "loss": 0.69}, {"step": 10, "grad_noise_scale": 61.5}]
        >>> write_json_atomic("out/trainer_state.json", {"global_step": 10, "log_history": log})
        >>> noise_scale_series("out")
        ([5, 10], [80.2, 61.5])
    """
    return _noise_scale_series(_trainer_state(output_dir))


def _noise_scale_series(state: dict | None) -> tuple[list[int], list[float]]:
    entries = [e for e in (state or {}).get("log_history", []) if NOISE_SCALE_KEY in e and "step" in e]
    return [e["step"] for e in entries], [float(e[NOISE_SCALE_KEY]) for e in entries]


@dataclass(frozen=True)
class EffectiveBatch:
    """The samples of one optimizer step over all processes: `per_process x accumulation x processes`.

    Attributes:
        per_process: the batch of one process's forward pass (`trainer_state.json`'s `train_batch_size`:
            `per_device_train_batch_size` times the GPUs of the process).
        accumulation: `gradient_accumulation_steps`.
        processes: the number of processes (`num_processes`).
    """

    per_process: int
    accumulation: int
    processes: int

    @property
    def total(self) -> int:
        return self.per_process * self.accumulation * self.processes

    def label(self) -> str:
        processes = "process" if self.processes == 1 else "processes"
        return (
            f"effective batch {self.total} samples ({self.per_process} x {self.accumulation} accumulation x "
            f"{self.processes} {processes})"
        )


def effective_batch(output_dir: str | os.PathLike, state: dict | None = None) -> EffectiveBatch | None:
    """The effective batch of the run in `output_dir`, or None when its files do not record it.

    The batch of one process is `train_batch_size` in `trainer_state.json`; the accumulation and the number of
    processes are read from `training_args.bin` without unpickling it (`run_folder.training_args_fields`); a count
    there out of range (above `MAX_COUNT`) counts as not recorded. `state`: the run's checked `trainer_state.json`
    (`_trainer_state`), when already read.

    Example:
        >>> import torch
        >>> from transformers import TrainingArguments
        >>> from hf_gradtools.atomic import write_json_atomic
        >>> args = TrainingArguments("out", per_device_train_batch_size=16, gradient_accumulation_steps=2)
        >>> write_json_atomic("out/trainer_state.json", {"train_batch_size": 16, "log_history": []})
        >>> torch.save(args, "out/training_args.bin")
        >>> effective_batch("out").total
        32
    """
    state = (_trainer_state(output_dir) if state is None else state) or {}
    per_process = state.get("train_batch_size")
    fields = training_args_fields(run_folder_of(output_dir), ["gradient_accumulation_steps", "num_processes"])
    accumulation, processes = fields.get("gradient_accumulation_steps"), fields.get("num_processes")
    counts = (per_process, accumulation, processes)
    if not all(is_count(c, low=1) for c in counts):
        return None
    return EffectiveBatch(per_process, accumulation, processes)


def draw_grad_noise_scale(steps: Sequence[int], values: Sequence[float], batch: EffectiveBatch | None = None):
    """The figure of `plot_grad_noise_scale`: `grad_noise_scale` (items) over the logging steps, one panel.

    With `batch`, a horizontal line at the run's effective batch, to compare the noise scale with (for
    sequence-level losses; for token-level ones the noise scale counts label tokens, not samples). A log axis when
    every value is positive and they span more than a factor 20; a zero line when one is not positive (early
    estimates can be, while the `|G|^2` average is near zero).
    """
    plt = _pyplot()
    values = _finite(values)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=120)
    marker = "o" if len(steps) <= 60 else None
    ax.plot(list(steps), values, color="tab:purple", marker=marker, markersize=3, linewidth=1.4, label=NOISE_SCALE_KEY)
    if batch is not None:
        ax.axhline(batch.total, color="tab:green", linestyle="--", linewidth=1.2, label=batch.label())
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0:
        _use_log_scale(ax, [finite + ([batch.total] if batch is not None else [])])
    elif finite:
        ax.axhline(0.0, color="gray", linewidth=0.8)
    last = f"; last {finite[-1]:.3g}" if finite else ""
    ax.set_title(
        f"Gradient noise scale (critical batch size, in items) at {len(steps)} logging steps{last}", fontsize=10
    )
    if batch is not None:
        ax.legend(loc="best", fontsize=8, frameon=False)
    ax.set_ylabel("grad_noise_scale (items)")
    ax.set_xlabel("optimizer step")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class NoiseScaleRecord:
    """What `plot_grad_noise_scale` draws, read and checked from the run's files (`read_noise_scale`)."""

    steps: list[int]
    values: list[float]
    batch: EffectiveBatch | None


def read_noise_scale(output_dir: str | os.PathLike) -> NoiseScaleRecord | None:
    """The logged `grad_noise_scale` of the run in `output_dir` and its effective batch; None when it logged none.

    Raises:
        ValueError: `trainer_state.json` is damaged or foreign (`_trainer_state`), naming the file and the field.
    """
    state = _trainer_state(output_dir)
    steps, values = _noise_scale_series(state)
    if not steps:
        return None
    return NoiseScaleRecord(steps, values, effective_batch(output_dir, state or {}))


def plot_grad_noise_scale(
    output_dir: str | os.PathLike, output: str | os.PathLike | None = None, record: NoiseScaleRecord | None = None
) -> str | None:
    """Draw the logged `grad_noise_scale` of the run in `output_dir` to a PNG, if the run logged it, with a line at
    the run's effective batch when its files record it (`effective_batch`).

    Args:
        output_dir: a run's `output_dir` (with `trainer_state.json`, as `trainer.save_state()` writes it).
        output: the PNG to write; default `<output_dir>/grad_noise_scale.png`.
        record: what `read_noise_scale(output_dir)` gave, when already read (default: read it now).

    Returns:
        The path written, or `None` (nothing written) when the log history holds no `grad_noise_scale`.
    """
    if record is None:
        record = read_noise_scale(output_dir)
    if record is None:
        return None
    figure = draw_grad_noise_scale(record.steps, record.values, record.batch)
    return _save(figure, output, run_folder_of(output_dir), NOISE_PLOT_FILE)


def histogram_file(step: int, param: str) -> str:
    """Default file name of a gradient histogram, e.g. `grad_hist_step-00000010_classifier.weight.png`."""
    safe = re.sub(r"[^\w.-]", "_", param)
    return f"grad_hist_step-{step:08d}_{safe}.png"


def plot_grad_histogram(
    output_dir: str | os.PathLike,
    param: str,
    step: int | None = None,
    output: str | os.PathLike | None = None,
    bins: int = 100,
) -> str:
    """Draw the histogram of one saved gradient tensor (`grad_snapshot_tensors`) to a PNG.

    Args:
        output_dir: the run's `output_dir` or its `grad_snapshots` folder.
        param: the parameter's full name.
        step: the snapshot step; default the last step with saved tensors.
        output: the PNG to write; default `<output_dir>/grad_hist_step-XXXXXXXX_<param>.png`.
        bins: number of histogram bins.

    Raises:
        FileNotFoundError: no saved tensors in the run, or none for `step`.
        ValueError: `param` was not saved at that step (the message lists some that were).
    """
    folder = run_folder_of(output_dir)
    if step is None:
        files = grad_tensor_files(folder)
        if not files:
            raise FileNotFoundError(
                f"No saved gradient tensors in {os.path.join(folder, SNAPSHOT_DIR)!r}: train with "
                "`grad_snapshot_tensors` (name patterns) and `grad_snapshot_steps` > 0."
            )
        step = max(files)
    tensors = load_grad_tensors(folder, step=step)
    if param not in tensors:
        raise ValueError(f"`--param` {param!r} was not saved at step {step}; saved: {example_names(list(tensors))}.")
    return _save(draw_grad_histogram(tensors[param], param, step, bins), output, folder, histogram_file(step, param))


def draw_grad_histogram(tensor: torch.Tensor, param: str, step: int, bins: int = 100):
    """The figure of `plot_grad_histogram`: a log-count histogram of the finite values of `tensor`, titled with
    the element count, mean, standard deviation, largest magnitude, L2 norm and the count of non-finite values.
    """
    plt = _pyplot()
    values = tensor.detach().float().flatten()
    finite = values[torch.isfinite(values)]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.hist(finite.numpy(), bins=bins, log=finite.numel() > 0, color="tab:blue")
    if finite.numel():
        spread = finite.std().item() if finite.numel() > 1 else 0.0
        stats = (
            f"{values.numel():,} elements, mean {finite.mean().item():.3g}, std {spread:.3g}, "
            f"max |g| {finite.abs().max().item():.3g}, L2 norm {finite.norm().item():.3g}"
        )
    else:
        stats = f"{values.numel():,} elements"
    if finite.numel() < values.numel():
        stats += f", {values.numel() - finite.numel():,} non-finite"
    ax.set_title(f"Gradient of {param} at step {step}\n{stats}", fontsize=9)
    ax.set_xlabel("gradient value")
    ax.set_ylabel("count (log scale)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig
