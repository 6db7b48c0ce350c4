#!/usr/bin/env python
"""Fine-tune every (task, setup) pair with `run_glue.py` and tabulate metric, time, throughput and memory.

    python examples/glue_results.py                          # SST-2, MRPC, CoLA x full, frozen 2, frozen 4, LoRA
    python examples/glue_results.py --tasks sst2 --setups full lora --max_train_samples 500
    python examples/glue_results.py --seeds 42 43 44 --jobs 2  # 3 seeds per row, two runs at a time
    python examples/glue_results.py --dry_run                # print the commands only

Each run is a fresh `python examples/run_glue.py ...` process, so that its peak memory is its own: the table's
"peak RSS" is the `ru_maxrss` that `os.wait4` reports for that process (the whole process: Python, torch, model,
data, optimizer state; the same measure as `resource.getrusage`). Training time and samples/s are the Trainer's
`train_runtime` and `train_samples_per_second`; trainable parameters come from `frozen_parameters.json`.

With several `--seeds`, each row is the mean over the seeds with the sample standard deviation (`0.861 ± 0.004`)
and the seed count; times and throughput are means, peak RSS the largest. `--jobs N` runs N runs at once, each
with its share of the CPU threads (faster overall, but each run's time then reflects the sharing).

Writes `<output_dir>/results.md` (the table) and `<output_dir>/results.json` (one entry per run), and every run's
folder `<output_dir>/<task>-<setup>-seed<seed>/` with its `run.log`, metrics, snapshots and `grad_norms.png`.
Rerunning some (task, setup, seed) runs replaces them and keeps the others of the same budget (`--fresh`: a new
table).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TASKS = ("sst2", "mrpc", "cola")
SETUPS = {
    "full": ("full fine-tune", []),
    "frozen2": ("frozen emb + layers 0-1", ["--freeze_embeddings", "--freeze_first_n_layers", "2"]),
    "frozen4": ("frozen emb + layers 0-3", ["--freeze_embeddings", "--freeze_first_n_layers", "4"]),
    "lora": ("LoRA r=8 (query, value)", ["--use_lora"]),
    "llrd": ("layer-wise LR decay 0.8", ["--layerwise_lr_decay", "0.8"]),
    "unfreeze": (
        "gradual unfreezing from emb + layers 0-3, every 10 steps",
        ["--freeze_embeddings", "--freeze_first_n_layers", "4", "--gradual_unfreeze_steps", "10"],
    ),
}
METRIC_NAMES = {"accuracy": "acc", "f1": "F1", "matthews_correlation": "MCC", "pearson": "Pearson",
                "spearmanr": "Spearman"}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=["cola", "sst2", "mrpc", "qqp", "stsb",
                        "mnli", "qnli", "rte", "wnli"], help="GLUE tasks (default: %(default)s)")  # fmt: skip
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS),
                        help="what to train (default: all)")  # fmt: skip
    parser.add_argument("--dataset_name", default="../shared/glue", help="GLUE data (default: %(default)s)")
    parser.add_argument("--model_name_or_path", default=None, help="default: run_glue.py's (all-MiniLM-L6-v2)")
    parser.add_argument("--max_train_samples", type=int, default=4000, help="training rows per task (default: 4000)")
    parser.add_argument("--num_train_epochs", type=float, default=1.0)
    parser.add_argument("--seq_len", type=int, default=64, help="max_seq_length, except sentence pairs")
    parser.add_argument("--pair_seq_len", type=int, default=128, help="max_seq_length of MRPC, RTE, ... pairs")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="full and frozen setups")
    parser.add_argument("--lora_learning_rate", type=float, default=2e-3)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="one run per seed (default: 42)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default: 1)")
    parser.add_argument("--output_dir", default="outputs/glue_results")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start a new table; by default the new rows replace their (task, setup) in the existing "
        "results.json, whose other rows are kept if they share the budget",
    )
    return parser


def run_command(args: argparse.Namespace, task: str, setup: str, out: str, seed: int = 42) -> list[str]:
    """The `run_glue.py` command line of one (task, setup, seed) run."""
    single = task in ("cola", "sst2")
    lr = args.lora_learning_rate if setup == "lora" else args.learning_rate
    command = [
        sys.executable, os.path.join(HERE, "run_glue.py"),
        "--task_name", task, "--dataset_name", args.dataset_name, "--do_train", "--do_eval",
        "--max_train_samples", str(args.max_train_samples), "--num_train_epochs", str(args.num_train_epochs),
        "--max_seq_length", str(args.seq_len if single else args.pair_seq_len),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "64",
        "--gradient_accumulation_steps", str(args.gradient_accumulation_steps),
        "--learning_rate", str(lr), "--warmup_steps", "0.1", "--max_grad_norm", "1.0", "--clip_norm_type", "2",
        "--grad_snapshot_steps", "10", "--logging_steps", "20", "--save_strategy", "no", "--seed", str(seed),
        "--disable_tqdm", "true", "--output_dir", out, "--overwrite_output_dir",
    ]  # fmt: skip
    if args.model_name_or_path:
        command += ["--model_name_or_path", args.model_name_or_path]
    return command + SETUPS[setup][1]


# The `run_glue.py` processes running now, so that a stopped sweep stops them too instead of leaving orphans.
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def run_and_measure(command: list[str], log_path: str, threads: int | None = None) -> tuple[int, float, float]:
    """Run `command` with its output in `log_path`; return exit status, wall seconds and peak RSS in MiB."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        with _RUNNING_LOCK:
            _RUNNING.add(process)
        try:
            # wait4 reaps this child and returns its own resource usage (ru_maxrss in KiB on Linux).
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(process)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024


def stop_running_runs() -> None:
    """Terminate every `run_glue.py` process this sweep started that is still running."""
    with _RUNNING_LOCK:
        for process in _RUNNING:
            process.terminate()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the sweep as Ctrl-C does: its runs are stopped, its table kept


def glue_metric_names(task: str) -> tuple[str, ...]:
    """The result keys of the GLUE metric of `task`, from the example's metric module."""
    path = os.path.join(HERE, "metrics", "glue", "glue.py")
    spec = importlib.util.spec_from_file_location("glue_metric_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.glue_metric_names(task)


def collect(
    task: str, setup: str, out: str, wall: float, peak_mib: float, args: argparse.Namespace, seed: int = 42
) -> dict:
    """One run's results from its `all_results.json` and `frozen_parameters.json`."""
    with open(os.path.join(out, "all_results.json"), encoding="utf-8") as f:
        results = json.load(f)
    with open(os.path.join(out, "frozen_parameters.json"), encoding="utf-8") as f:
        frozen = json.load(f)
    total = frozen["num_trainable"] + frozen["num_frozen"]
    return {
        "task": task,
        "setup": setup,
        "seed": seed,
        "metrics": {name: results[f"eval_{name}"] for name in glue_metric_names(task)},
        "train_runtime_s": results["train_runtime"],
        "train_samples_per_second": results["train_samples_per_second"],
        "train_samples": results["train_samples"],
        "eval_samples": results["eval_samples"],
        "trainable_params": frozen["num_trainable"],
        "total_params": total,
        "peak_rss_mib": peak_mib,
        "wall_s": wall,
        "learning_rate": args.lora_learning_rate if setup == "lora" else args.learning_rate,
        "top_class_share": results.get("eval_top_class_share"),
        "budget": budget_key(args),
    }


def budget_key(args: argparse.Namespace) -> dict:
    """The settings every row of one table must share (the learning rate is a column of its own)."""
    keys = ("dataset_name", "model_name_or_path", "max_train_samples", "num_train_epochs", "seq_len", "pair_seq_len",
            "batch_size", "gradient_accumulation_steps")  # fmt: skip
    return {key: getattr(args, key) for key in keys}


def _run_key(row: dict) -> tuple:
    return row["task"], row["setup"], row.get("seed", 42)


def merge(previous: list[dict], new: list[dict], budget: dict) -> list[dict]:
    """`new` runs, plus the `previous` runs of the same budget that `new` does not redo, in table order."""
    redone = {_run_key(row) for row in new}
    kept = [r for r in previous if r.get("budget") == budget and _run_key(r) not in redone]
    order = {task: i for i, task in enumerate(TASKS)}
    setups = {setup: i for i, setup in enumerate(SETUPS)}
    return sorted(
        kept + new, key=lambda r: (order.get(r["task"], len(order)), r["task"], setups[r["setup"]], _run_key(r)[2])
    )


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (task, setup): metric means and sample standard deviations over its seeds, in run order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["setup"]), []).append(run)
    rows = []
    for group in groups.values():
        first = group[0]

        def mean(key: str, group=group) -> float:
            return statistics.fmean(run[key] for run in group)

        metrics = {}
        for name in first["metrics"]:
            values = [run["metrics"][name] for run in group]
            spread = statistics.stdev(values) if len(values) > 1 else None
            metrics[name] = (statistics.fmean(values), spread)
        rows.append(
            {
                **{key: first[key] for key in ("task", "setup", "learning_rate", "trainable_params", "total_params")},
                "seeds": sorted(run.get("seed", 42) for run in group),
                "metrics": metrics,
                "train_runtime_s": mean("train_runtime_s"),
                "train_samples_per_second": mean("train_samples_per_second"),
                # None where a run's process was not measured (a table rebuilt from run folders)
                "peak_rss_mib": max(
                    (r["peak_rss_mib"] for r in group if r.get("peak_rss_mib") is not None), default=None
                ),
                "one_class_runs": sum(1 for run in group if (run.get("top_class_share") or 0) >= 1.0),
            }
        )
    return rows


def _format_metric(name: str, value) -> str:
    mean, spread = value if isinstance(value, (tuple, list)) else (value, None)
    text = f"{METRIC_NAMES.get(name, name)} {mean:.3f}"
    return text if spread is None else f"{text} ± {spread:.3f}"


def format_table(rows: list[dict]) -> str:
    """The results as a markdown table: one row per (task, setup), a run or the `aggregate` of its seeds.

    Example:
        >>> print(format_table([{"task": "sst2", "setup": "full", "metrics": {"accuracy": (0.8612, 0.0043)},
        ...     "seeds": [42, 43, 44], "train_runtime_s": 61.2, "train_samples_per_second": 32.7,
        ...     "trainable_params": 22713986, "total_params": 22713986, "peak_rss_mib": 1510.4,
        ...     "learning_rate": 1e-4}]).splitlines()[2])
        | SST-2 | full fine-tune | 0.0001 | acc 0.861 ± 0.004 | 3 | 61 | 32.7 | 22.71M (100%) | 1510 |
    """
    names = {"sst2": "SST-2", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "qqp": "QQP", "mnli": "MNLI",
             "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}  # fmt: skip
    lines = [
        "| task | setup | learning rate | validation metric (mean ± sd) | seeds | train time (s) | samples/s "
        "| trainable params | peak RSS (MiB) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        metric = ", ".join(_format_metric(k, v) for k, v in row["metrics"].items())
        if row.get("one_class_runs"):
            metric += f" ({row['one_class_runs']} run(s) predict one class)"
        share = 100 * row["trainable_params"] / row["total_params"]
        task = names.get(row["task"], row["task"])
        lines.append(
            f"| {task} | {SETUPS[row['setup']][0]} | {row['learning_rate']:g} | {metric} "
            f"| {len(row.get('seeds', [row.get('seed', 42)]))} "
            f"| {row['train_runtime_s']:.0f} | {row['train_samples_per_second']:.1f} "
            f"| {row['trainable_params'] / 1e6:.2f}M ({share:.{0 if share >= 10 else 1}f}%) "
            f"| {'n/a' if row['peak_rss_mib'] is None else format(row['peak_rss_mib'], '.0f')} |"
        )
    return "\n".join(lines)


def budget_line(args: argparse.Namespace, seeds: Sequence[int] | None = None) -> str:
    seeds = ", ".join(str(seed) for seed in sorted(set(seeds or args.seeds)))
    epochs = f"{args.num_train_epochs:g} epoch{'' if args.num_train_epochs == 1 else 's'}"
    sharing = f", {args.jobs} runs at a time (train time and samples/s under that sharing)" if args.jobs > 1 else ""
    return (
        f"Budget per run: the first {args.max_train_samples} training rows (all of them if fewer), {epochs}, "
        f"batch {args.batch_size} x {args.gradient_accumulation_steps} accumulation steps, max_seq_length "
        f"{args.seq_len} (sentence pairs {args.pair_seq_len}), AdamW with the learning rate of the table, 10% warmup "
        f"then linear decay, L2 clipping at 1.0, seeds {seeds}; full validation split. Machine: {machine()}{sharing}."
    )


def machine() -> str:
    """Where the runs train: the GPU the Trainer picks if torch sees one, else the CPU cores."""
    import torch

    if torch.cuda.is_available():
        return f"one {torch.cuda.get_device_name(0)} GPU, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch CPU"


def write_results(args: argparse.Namespace, runs: list[dict]) -> tuple[str, str]:
    """Write `results.md` and `results.json` of `runs` atomically; return the table and its budget line."""
    table = format_table(aggregate(runs))
    budget = budget_line(args, [run.get("seed", 42) for run in runs])
    write_atomic(os.path.join(args.output_dir, "results.md"), table + "\n\n" + budget + "\n")
    write_atomic(os.path.join(args.output_dir, "results.json"), json.dumps({"budget": budget, "runs": runs}, indent=1))
    return table, budget


def write_atomic(path: str, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it: a killed sweep leaves the old file whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    planned = []
    for task in args.tasks:
        for setup in args.setups:
            for seed in args.seeds:
                out = os.path.join(args.output_dir, f"{task}-{setup}-seed{seed}")
                planned.append((task, setup, seed, out, run_command(args, task, setup, out, seed)))
    if args.dry_run:
        for *_, command in planned:
            print(" ".join(command))
        return 0
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def run_one(plan):
        task, setup, seed, out, command = plan
        name = f"{task} / {setup} / seed {seed}"
        os.makedirs(out, exist_ok=True)
        print(f"[{name}] running ...", flush=True)
        status, wall, peak = run_and_measure(command, os.path.join(out, "run.log"), threads)
        if stopping.is_set():
            print(f"[{name}] stopped with the sweep", flush=True)
            return None
        if status != 0:
            print(f"[{name}] FAILED with status {status}; see {out}/run.log", flush=True)
            return None
        row = collect(task, setup, out, wall, peak, args, seed)
        snapshots = os.path.join(out, "grad_snapshots")
        if os.path.isdir(snapshots) and os.listdir(snapshots):  # a run of fewer than 10 steps has none to draw
            subprocess.run([sys.executable, "-m", "hf_gradtools", "plot", out], cwd=ROOT, check=False,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items())
        print(f"[{name}] {metrics}; {wall:.0f} s wall, peak RSS {peak:.0f} MiB", flush=True)
        return row

    results_file = os.path.join(args.output_dir, "results.json")
    previous = []
    if os.path.isfile(results_file) and not args.fresh:
        with open(results_file, encoding="utf-8") as f:
            previous = json.load(f).get("runs", [])
    finished: list[dict] = []
    lock = threading.Lock()

    def run_and_record(plan):
        row = run_one(plan)
        if row is not None:  # the table on disk grows run by run: a killed sweep keeps what it finished
            with lock:
                finished.append(row)
                write_results(args, merge(previous, finished, budget_key(args)))
        return row

    stopping = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    try:
        outcomes = list(pool.map(run_and_record, planned))
    except KeyboardInterrupt:
        # Stop the runs in flight; a run that had already ended still records its row before the sweep stops.
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        stop_running_runs()
        pool.shutdown(wait=True)
        print(f"Stopped. {len(finished)} finished run(s) are in {results_file}.", file=sys.stderr)
        raise
    pool.shutdown()
    failed = [
        f"{task}-{setup}-seed{seed}"
        for (task, setup, seed, *_), row in zip(planned, outcomes, strict=True)
        if row is None
    ]
    table, budget = write_results(args, merge(previous, finished, budget_key(args)))
    print(table)
    print(budget)
    if failed:
        print(f"failed runs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # the script only: `main()` called from Python leaves signals alone
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)  # stopped (Ctrl-C or SIGTERM): the message above says what was kept
