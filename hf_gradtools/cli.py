"""`hf-gradtools`: look at what the gradients of a GradTrainer run did, from its `output_dir`.

    hf-gradtools plot outputs/sst2                 # per-layer gradient norms over steps -> outputs/sst2/grad_norms.png
    hf-gradtools plot outputs/sst2 --output a.png  # a logged noise scale goes to ./a_noise_scale.png, beside it
    hf-gradtools plot outputs/sst2 --params attention --params ^classifier   # chosen parameters, not groups
    hf-gradtools summary outputs/sst2 --top 5      # frozen/trainable counts, largest gradients of the last snapshot
    hf-gradtools summary outputs/sst2 --mean       # ... averaged over every snapshot instead
    hf-gradtools hist outputs/sst2 --step 10 --param classifier.weight   # histogram of a saved gradient tensor

    hf-gradtools --version

When the run logged `grad_noise_scale` (`log_grad_noise_scale`) and its `trainer_state.json` is there
(`trainer.save_state()`, as `examples/run_glue.py` does), `plot` also draws it over the logging steps to
`grad_noise_scale.png` in the run folder (with `--output FILE.png`: `FILE_noise_scale.png`, so that two runs plotted
into one folder keep their own); a run that logged it but took no snapshots gets that figure alone, with a note on
stderr.

`python -m hf_gradtools ...` does the same. A folder without `frozen_parameters.json` or without snapshots, a
damaged or foreign file (named, with the field at fault) and a link that leads out of the run folder (not
followed, `run_folder.py`) are each reported in one line on stderr, with exit status 1; `summary` of a run that
froze but took no snapshots prints its frozen and trainable counts, then says that there are none (exit 0).

When the run's `all_results.json` holds the class spread of its predictions (`eval_top_class` and
`eval_top_class_share`, as `examples/run_glue.py` writes them), `summary` also says which class was predicted most
often, and flags a degenerate run: one whose predictions are all one class.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from . import __version__
from .plotting import (
    NOISE_PLOT_FILE,
    PLOT_FILE,
    check_description,
    frozen_groups,
    group_norms,
    load_run,
    plot_grad_histogram,
    plot_grad_noise_scale,
    plot_grad_norms,
    read_noise_scale,
    run_folder_of,
)
from .run_folder import UnreadableRunFileError, is_finite_number, read_run_json
from .snapshots import FROZEN_PARAMETERS_FILE, summary_line

PROG = "hf-gradtools"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _format_norm_type(norm_type) -> str:
    value = float(norm_type)
    return "inf" if math.isinf(value) else f"{value:g}"


RESULT_FILES = ("all_results.json", "eval_results.json", "predict_results.json")
SHARE_SUFFIX = "_top_class_share"


def _read_json(folder: str, name: str) -> dict:
    """The JSON object of the file `name` in the run `folder`; `{}` when there is no such file.

    A file that is damaged, not an object or a link out of the run folder is refused (`ValueError` naming it)."""
    path = os.path.join(folder, name)
    try:
        data = read_run_json(folder, path)
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise UnreadableRunFileError(f"{path!r} is a JSON {type(data).__name__}, not an object.")
    return data


def prediction_lines(output_dir: str) -> list[str]:
    """One line per evaluated split on its most predicted class; a degenerate (one-class) split is flagged.

    Reads `<prefix>_top_class` / `<prefix>_top_class_share` from the run's result files and the class names from
    its `config.json`; a run without them gives no line.

    Example:
        >>> from hf_gradtools.atomic import write_json_atomic
        >>> write_json_atomic("out/eval_results.json", {"eval_top_class": 1, "eval_top_class_share": 1.0,
        ...     "eval_samples": 408})
        >>> write_json_atomic("out/config.json", {"id2label": {"0": "not_equivalent", "1": "equivalent"}})
        >>> prediction_lines("out")
        ["DEGENERATE eval predictions: all 408 are class 1 'equivalent' (100%): the model answers one class"]
    """
    folder = run_folder_of(output_dir)
    metrics: dict = {}
    for name in RESULT_FILES:
        metrics = {**_read_json(folder, name), **metrics}
    names = _read_json(folder, "config.json").get("id2label")
    names = names if isinstance(names, dict) else {}
    lines = []
    for key, share in metrics.items():
        if not key.endswith(SHARE_SUFFIX) or not is_finite_number(share):
            continue
        prefix = key[: -len(SHARE_SUFFIX)]
        class_id = metrics.get(f"{prefix}_top_class")
        if not is_finite_number(class_id):
            continue
        label = names.get(str(int(class_id)))
        what = f"class {int(class_id)}" + (f" {label!r}" if label is not None else "")
        count = metrics.get(f"{prefix}_samples")
        if share >= 1.0:
            rows = f"all {count}" if isinstance(count, int) else "all"
            lines.append(f"DEGENERATE {prefix} predictions: {rows} are {what} (100%): the model answers one class")
        else:
            lines.append(f"{prefix} predictions: most often {what} ({share:.1%})")
    return lines


def _layout_lines(description: dict) -> list[str]:
    """The frozen/trainable counts, the layer stack, the embeddings and the fully frozen groups."""
    layer_stack, embeddings = description.get("layer_stack"), description.get("embeddings") or []
    return [
        summary_line(description),
        f"layer stack: {layer_stack or 'not found'}; embeddings: {', '.join(embeddings) or 'not found'}; "
        f"fully frozen groups: {', '.join(frozen_groups(description)) or 'none'}",
    ]


def _frozen_lines(output_dir: str) -> list[str]:
    """`_layout_lines` of the run's `frozen_parameters.json` when it holds the counts; else none."""
    folder = run_folder_of(output_dir)
    path = os.path.join(folder, FROZEN_PARAMETERS_FILE)
    if not os.path.isdir(folder) or not os.path.lexists(path):
        return []
    try:
        return _layout_lines(check_description(read_run_json(folder, path), path, counts=True))
    except ValueError:
        return []  # not a complete record: the missing snapshots are the error to report


def summarize(output_dir: str, top: int = 10, mean: bool = False) -> str:
    """The text `hf-gradtools summary` prints for the run in `output_dir`.

    Lists the frozen/trainable counts, the fully frozen groups, each group's norm, and the `top` largest
    per-parameter gradient norms of the last snapshot, or with `mean=True` their mean over all snapshots.

    Example (on the files a run writes, `snapshots.py`, here written by hand):
        >>> from hf_gradtools.atomic import write_json_atomic
        >>> write_json_atomic("out/frozen_parameters.json", {"frozen": ["embeddings.weight"], "num_frozen": 6400,
        ...     "trainable": ["classifier.weight", "classifier.bias"], "num_trainable": 130,
        ...     "layer_stack": None, "embeddings": ["embeddings"]})
        >>> write_json_atomic("out/grad_snapshots/step-00000010.json", {"step": 10, "norm_type": 2.0,
        ...     "total_norm_pre_clip": 2.5, "total_norm_post_clip": 1.0,
        ...     "norms": {"classifier.weight": 2.0, "classifier.bias": 1.5}})
        >>> print(summarize("out", top=2))
        frozen: 1 tensors, 6,400 elements; trainable: 2 tensors, 130 elements (2.0% of 6,530)
        layer stack: not found; embeddings: embeddings; fully frozen groups: embeddings
        snapshots: 1 (steps 10 to 10), norm type 2, before clipping; last total norm 2.5 (after clipping 1)
        group norms at step 10: head 2.5
        largest gradient norms in the last snapshot (step 10), top 2 of 2:
            1.   2  classifier.weight
            2. 1.5  classifier.bias
    """
    try:
        description, snapshots = load_run(output_dir)
    except FileNotFoundError as error:
        # A run without snapshots still has its frozen counts (a run that froze) and its predictions to report.
        lines = _frozen_lines(output_dir)
        lines += prediction_lines(output_dir) if os.path.isdir(output_dir) else []
        if not lines:
            raise
        return "\n".join([*lines, f"no gradient record: {error}"])
    check_description(description, os.path.join(run_folder_of(output_dir), FROZEN_PARAMETERS_FILE), counts=True)
    last = snapshots[-1]
    norm_type = _format_norm_type(last.get("norm_type", 2.0))
    steps = [s["step"] for s in snapshots]

    lines = [
        *_layout_lines(description),
        f"snapshots: {len(snapshots)} (steps {steps[0]} to {steps[-1]}), norm type {norm_type}, before clipping; "
        f"last total norm {last['total_norm_pre_clip']:.4g} (after clipping {last['total_norm_post_clip']:.4g})",
    ]
    lines += prediction_lines(output_dir)
    groups = group_norms(last, description)
    lines.append(f"group norms at step {last['step']}: " + ", ".join(f"{g} {v:.4g}" for g, v in groups.items()))

    if mean:
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for snapshot in snapshots:
            for name, value in snapshot["norms"].items():
                sums[name] = sums.get(name, 0.0) + value
                counts[name] = counts.get(name, 0) + 1
        norms = {name: sums[name] / counts[name] for name in sums}
        heading = f"largest gradient norms, averaged over all {len(snapshots)} snapshots"
    else:
        norms = last["norms"]
        heading = f"largest gradient norms in the last snapshot (step {last['step']})"
    ranked = sorted(norms.items(), key=lambda item: item[1], reverse=True)[:top]
    lines.append(f"{heading}, top {len(ranked)} of {len(norms)}:")
    width = max((len(f"{value:.4g}") for _, value in ranked), default=0)
    lines += [f"  {rank:>3}. {value:>{width}.4g}  {name}" for rank, (name, value) in enumerate(ranked, start=1)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Plot and summarize the gradient snapshots of a GradTrainer run."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plot,summary,hist}")

    plot = commands.add_parser(
        "plot",
        help=f"draw per-layer gradient norms over steps to a PNG (and a logged noise scale to {NOISE_PLOT_FILE})",
    )
    plot.add_argument("output_dir", help="the run's output_dir (holding frozen_parameters.json and grad_snapshots/)")
    plot.add_argument(
        "--output",
        "-o",
        default=None,
        help=f"PNG to write (default: <output_dir>/{PLOT_FILE}); a logged noise scale goes to <name>_noise_scale.png",
    )
    plot.add_argument(
        "--params",
        action="append",
        metavar="PATTERN",
        default=None,
        help="draw the parameters whose names this regex matches (re.search) instead of the groups; repeatable",
    )

    summary = commands.add_parser("summary", help="print frozen/trainable counts and the largest gradient norms")
    summary.add_argument(
        "output_dir", help="the run's output_dir (holding frozen_parameters.json and grad_snapshots/)"
    )
    summary.add_argument("--top", type=_positive_int, default=10, help="how many parameters to list (default: 10)")
    summary.add_argument(
        "--mean", action="store_true", help="rank by the mean norm over all snapshots instead of the last one"
    )

    hist = commands.add_parser("hist", help="draw a histogram of one saved gradient tensor to a PNG")
    hist.add_argument("output_dir", help="the run's output_dir (holding grad_snapshots/step-*.safetensors)")
    hist.add_argument("--param", required=True, metavar="NAME", help="full parameter name, e.g. classifier.weight")
    hist.add_argument(
        "--step", type=_positive_int, default=None, help="snapshot step (default: the last one with saved tensors)"
    )
    hist.add_argument("--bins", type=_positive_int, default=100, help="number of bins (default: 100)")
    hist.add_argument(
        "--output", "-o", default=None, help="PNG to write (default: <output_dir>/grad_hist_step-<N>_<NAME>.png)"
    )
    return parser


def check_png_output(path: str) -> None:
    """Refuse an `--output` that cannot be the PNG asked for: another extension, or an existing folder."""
    if not path.lower().endswith(".png"):
        raise ValueError(f"--output {path!r}: the plots are PNG files; give a name ending in .png")
    if os.path.isdir(path):
        raise ValueError(f"--output {path!r} is a folder; give a file name ending in .png")


def _plot(args: argparse.Namespace) -> None:
    """`plot`: the gradient norms, and the noise scale beside them when the run logged it.

    Every file the command draws from is read and checked first: a damaged one is refused before any PNG is written.
    """
    noise_output = None
    if args.output:
        check_png_output(args.output)
        noise_output = os.path.splitext(args.output)[0] + "_noise_scale.png"
    try:
        run, missing = load_run(args.output_dir), None
    except FileNotFoundError as error:
        run, missing = None, error
    noise = read_noise_scale(args.output_dir)
    if run is None:
        if noise is None:
            raise missing
        print(f"wrote {plot_grad_noise_scale(args.output_dir, noise_output, record=noise)}")
        print(f"{PROG}: note: no gradient-norm plot: {missing}", file=sys.stderr)
        return
    print(f"wrote {plot_grad_norms(args.output_dir, args.output, params=args.params, run=run)}")
    if noise is not None:
        print(f"wrote {plot_grad_noise_scale(args.output_dir, noise_output, record=noise)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 on success, 1 on a bad run folder, 2 on bad usage)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plot":
            _plot(args)
        elif args.command == "hist":
            if args.output:
                check_png_output(args.output)
            path = plot_grad_histogram(args.output_dir, args.param, step=args.step, output=args.output, bins=args.bins)
            print(f"wrote {path}")
        else:
            print(summarize(args.output_dir, top=args.top, mean=args.mean))
    except ImportError as error:
        print(
            f"{PROG}: error: {error.name or error} is not installed; pip install 'hf_gradtools[plot]'", file=sys.stderr
        )
        return 1
    except BrokenPipeError:  # the reader stopped early (`| head`): nothing is wrong; quiet, as other tools are
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not complain again
        return 0
    except (OSError, ValueError, KeyError, TypeError) as error:
        message = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
