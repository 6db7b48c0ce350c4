"""Per-layer gradient norms over training steps, from a run's snapshots, drawn to a PNG.

Each parameter name of a snapshot goes to one group, using `layer_stack` and `embeddings` from the run's
`frozen_parameters.json`: names under `<layer_stack>.<i>.` go to `"layer i"`, names under an embeddings module
to `"embeddings"`, everything else (pooler, classifier, final norm) to `"head"`. A group's norm is the norm, in
the snapshot's `norm_type`, of its parameters' norms: the norm of the group's gradient as one vector. Frozen
parameters have no gradient, so a fully frozen group is not drawn.

matplotlib is imported only by `plot_grad_norms` (`pip install 'hf_gradtools[plot]'`), with the `Agg` backend.

Example:
    >>> description = {"layer_stack": "bert.encoder.layer", "embeddings": ["bert.embeddings"]}
    >>> snapshot = {"step": 10, "norm_type": 2.0, "norms": {"bert.encoder.layer.1.output.dense.weight": 3.0,
    ...     "bert.encoder.layer.1.output.dense.bias": 4.0, "classifier.weight": 1.0}}
    >>> group_norms(snapshot, description)
    {'layer 1': 5.0, 'head': 1.0}
    >>> plot_grad_norms("outputs/sst2")  # doctest: +SKIP
    'outputs/sst2/grad_norms.png'
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

from .clipping import check_norm_type
from .monitoring import EMBEDDINGS, HEAD, parameter_group
from .monitoring import group_order as _group_order
from .snapshots import FROZEN_PARAMETERS_FILE, SNAPSHOT_DIR, load_grad_snapshots

PLOT_FILE = "grad_norms.png"


def _run_folder(path: str | os.PathLike) -> str:
    folder = os.fspath(path).rstrip(os.sep) or os.sep
    if os.path.basename(folder) == SNAPSHOT_DIR and not os.path.isdir(os.path.join(folder, SNAPSHOT_DIR)):
        folder = os.path.dirname(folder) or "."
    return folder


def load_run(output_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """Read a run's `frozen_parameters.json` and its snapshots (in step order).

    `output_dir` is the run's `output_dir`, or its `grad_snapshots` folder.

    Raises:
        FileNotFoundError: the folder, `frozen_parameters.json` or every snapshot is missing.
        ValueError: a file is not valid JSON.
    """
    folder = _run_folder(output_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder; give the `output_dir` of a GradTrainer run.")
    path = os.path.join(folder, FROZEN_PARAMETERS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {FROZEN_PARAMETERS_FILE} in {folder!r}: not the `output_dir` of a GradTrainer run, "
            "or its training did not start."
        )
    try:
        with open(path, encoding="utf-8") as f:
            description = json.load(f)
        snapshots = load_grad_snapshots(folder) if os.path.isdir(os.path.join(folder, SNAPSHOT_DIR)) else []
    except json.JSONDecodeError as error:
        raise ValueError(f"A file of the run in {folder!r} is not valid JSON: {error}") from None
    if not snapshots:
        raise FileNotFoundError(
            f"No gradient snapshot in {os.path.join(folder, SNAPSHOT_DIR)!r}: train with `grad_snapshot_steps` > 0 "
            "(e.g. --grad_snapshot_steps 10) for at least that many optimizer steps."
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
    """The groups whose every parameter is frozen, in plot order (e.g. `["embeddings", "layer 0"]`).

    Example:
        >>> frozen_groups({"layer_stack": "enc.layer", "embeddings": ["emb"],
        ...     "frozen": ["emb.word.weight", "enc.layer.0.w"], "trainable": ["enc.layer.1.w", "head.w"]})
        ['embeddings', 'layer 0']
    """
    layer_stack, embeddings = description.get("layer_stack"), description.get("embeddings") or []
    frozen: dict[str, bool] = {}
    for name in description.get("frozen", []):
        frozen.setdefault(parameter_group(name, layer_stack, embeddings), True)
    for name in description.get("trainable", []):
        frozen[parameter_group(name, layer_stack, embeddings)] = False
    return sorted((group for group, is_frozen in frozen.items() if is_frozen), key=_group_order)


def group_norms(snapshot: dict, description: dict) -> dict[str, float]:
    """Norm of each parameter group in one snapshot, ordered embeddings, layer 0, layer 1, ..., head.

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


def plot_grad_norms(output_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> str:
    """Draw the per-group gradient norms of the run in `output_dir` over its snapshot steps to a PNG.

    Args:
        output_dir: a run's `output_dir` (with `grad_snapshots/`) or the snapshot folder itself.
        output: the PNG to write; default `<output_dir>/grad_norms.png`.

    Returns:
        The path written.

    Raises:
        FileNotFoundError, ValueError: as `load_run`.
    """
    description, snapshots = load_run(output_dir)
    steps, series = group_norm_series(snapshots, description)
    totals = [float(s["total_norm_pre_clip"]) for s in snapshots]
    clipped = [float(s["total_norm_post_clip"]) for s in snapshots]
    output = os.fspath(output) if output is not None else os.path.join(_run_folder(output_dir), PLOT_FILE)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [group for group in series if group not in (EMBEDDINGS, HEAD)]
    colormap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    try:
        marker = "o" if len(steps) <= 30 else None
        ax.plot(steps, totals, color="black", linestyle="--", linewidth=1.2, label="total, before clipping")
        if any(abs(a - b) > 1e-6 * max(a, 1e-12) for a, b in zip(totals, clipped, strict=True)):
            ax.plot(steps, clipped, color="gray", linestyle=":", linewidth=1.2, label="total, after clipping")
        for group, values in series.items():
            if group == EMBEDDINGS:
                color = "tab:red"
            elif group == HEAD:
                color = "tab:orange"
            else:
                color = colormap(layers.index(group) / max(len(layers) - 1, 1) * 0.9)
            ax.plot(steps, values, color=color, marker=marker, markersize=3, linewidth=1.4, label=group)
        positive = [v for values in [totals, clipped, *series.values()] for v in values if v > 0 and math.isfinite(v)]
        if positive and max(positive) / min(positive) > 20:
            ax.set_yscale("log")
        norm_type = snapshots[-1].get("norm_type", 2.0)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"gradient norm ({_norm_label(norm_type)}); groups before clipping")
        frozen = ", ".join(frozen_groups(description)) or "none"
        ax.set_title(f"Gradient norm per layer group over {len(steps)} snapshots (frozen: {frozen})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        fig.tight_layout()
        folder = os.path.dirname(output)
        if folder:
            os.makedirs(folder, exist_ok=True)
        fig.savefig(output, format="png")
    finally:
        plt.close(fig)
    return output
