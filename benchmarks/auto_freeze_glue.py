"""End to end, side by side in one run: the full fine-tune against automatic freezing with the activation cache.

For each task, the shipped recipe without any freezing (the full fine-tune) and `recipes/<task>_autofreeze.json`
run one after the other, each in a fresh process, on the same machine; the table gives each run's wall time, its
training time, the validation score and the ratio, and the step at which each block froze.

    python benchmarks/auto_freeze_glue.py [--tasks mrpc sst2] [--seeds 42] [--variants other.json ...]

`--variants` runs further recipes (JSON files of settings laid over the task's autofreeze recipe) after it, each
against the same full fine-tune; `--only-variants` leaves the shipped autofreeze recipe out. `--common` lays one JSON
file of settings (e.g. `{"num_train_epochs": 5}`) over every run, the full fine-tune's included, so that both sides
train the same schedule. `--name` names the results files (default `auto_freeze_glue_<tasks>`). Each run is
`examples/run_glue.py` with a clock on every optimizer step. Writes benchmarks/results/auto_freeze_glue_<tasks>.md
(and .json), and per task a PNG of the first seed's pair: the per-layer gradient norms of the autofreeze run (its
recipe logs them) with the freezing decisions marked, and the step time of both runs over training.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUN_GLUE = os.path.join(ROOT, "examples", "run_glue.py")
SCORE = {"mrpc": "eval_f1", "sst2": "eval_accuracy", "cola": "eval_matthews_correlation"}
STEP_TIMES = "step_times.json"  # written beside the run's results: the seconds of every optimizer step


def timed_run_glue(recipe_path: str) -> None:
    """`python examples/run_glue.py recipe_path`, in this process, with a clock on every optimizer step."""
    sys.path.insert(0, HERE)
    from schedules_timeline import StepClock

    import hf_gradtools

    train = hf_gradtools.GradTrainer.train

    def timed_train(self, *args, **kwargs):
        clock = StepClock()
        self.add_callback(clock)
        try:
            return train(self, *args, **kwargs)
        finally:
            with open(os.path.join(self.args.output_dir, STEP_TIMES), "w") as f:
                json.dump(clock.times, f)

    hf_gradtools.GradTrainer.train = timed_train
    sys.argv = [RUN_GLUE, recipe_path]
    sys.path.insert(0, os.path.dirname(RUN_GLUE))  # as `python examples/run_glue.py` would: its own modules
    runpy.run_path(RUN_GLUE, run_name="__main__")


def run(recipe: dict, out: str) -> dict:
    recipe = {**recipe, "output_dir": out, "dataset_name": os.path.join(ROOT, "..", "shared", "glue")}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(recipe, f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--timed-run", f.name], check=True, env=env)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "all_results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "trainer_state.json")) as f:
        logs = json.load(f)["log_history"]
    froze, seen = [], 0
    for log in logs:
        while log.get("frozen_layers", 0) > seen:
            seen += 1
            froze.append(log["step"])
    with open(os.path.join(out, STEP_TIMES)) as f:
        step_times = json.load(f)
    return {
        "wall_s": wall,
        "train_s": results["train_runtime"],
        "results": results,
        "froze_at": froze,
        "logs": logs,
        "step_times": step_times,
    }


def plot(row: dict, path: str) -> None:
    """One run pair: the per-layer gradient norms of the autofreeze run with its freezing decisions marked, and
    the step time of both runs over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    auto, full = row["autofreeze"], row["full"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 2])
    logs = [log for log in auto["logs"] if "loss" in log]
    keys = sorted({k for log in logs for k in log if k.startswith("grad_norm/")}, key=_group_order)
    for key in keys:
        points = [(log["step"], log[key]) for log in logs if log.get(key, 0) > 0]
        if points:
            top.plot(*zip(*points, strict=True), linewidth=1.2, label=key.removeprefix("grad_norm/"))
    decisions: dict[int, list[str]] = {}
    for block, step in enumerate(auto["froze_at"]):
        decisions.setdefault(step, []).append(f"layer.{block}")
    for step, blocks in decisions.items():
        top.axvline(step, color="black", alpha=0.4, linestyle="--")
        top.annotate(f"{', '.join(blocks)} frozen", (step, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                     va="top", ha="right", fontsize=8)  # fmt: skip
    top.set_yscale("log")
    top.set_ylabel("gradient norm before clipping")
    top.legend(fontsize=8, ncol=4)
    metric = SCORE[row["task"]]
    top.set_title(
        f"{row['task']}, seed {row['seed']}, {row['recipe']}: {metric} {auto['results'][metric]:.3f} against "
        f"{full['results'][metric]:.3f}, {full['wall_s'] / auto['wall_s']:.2f}x faster end to end"
    )
    for name, run in (("full fine-tune", full), ("automatic freezing + cache", auto)):
        times = run["step_times"]
        smooth = [statistics.median(times[max(0, i - 4) : i + 1]) for i in range(len(times))]
        bottom.plot(range(1, len(times) + 1), smooth, label=name)
    bottom.set_ylabel("seconds per optimizer step (median of 5)")
    bottom.set_xlabel("optimizer step")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _group_order(key: str) -> tuple[int, int]:
    group = key.removeprefix("grad_norm/")
    if group.startswith("layer."):
        return 1, int(group.split(".")[1])
    return (0, 0) if group == "embeddings" else (2, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["mrpc", "sst2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--variants", nargs="*", default=[], help="JSON files laid over the autofreeze recipe")
    parser.add_argument("--only-variants", action="store_true", help="leave the shipped autofreeze recipe out")
    parser.add_argument("--common", help="a JSON file of settings laid over every run, the full fine-tune's too")
    parser.add_argument("--name", help="the results files' name (default: auto_freeze_glue_<tasks>)")
    parser.add_argument("--timed-run", help=argparse.SUPPRESS)  # the child process: one run, with a step clock
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "auto_freeze_glue"))
    args = parser.parse_args()
    if args.timed_run:
        timed_run_glue(args.timed_run)
        return
    rows = []
    common = {}
    if args.common:
        with open(args.common) as f:
            common = json.load(f)
    results_name = args.name or f"auto_freeze_glue_{'_'.join(args.tasks)}"
    for task in args.tasks:
        with open(os.path.join(ROOT, "examples", "recipes", f"{task}.json")) as f:
            full = json.load(f)
        full.pop("freeze_embeddings", None)
        full.pop("freeze_first_n_layers", None)
        full = {**full, **common}
        with open(os.path.join(ROOT, "examples", "recipes", f"{task}_autofreeze.json")) as f:
            auto = {**json.load(f), **common}
        recipes = {} if args.only_variants else {f"{task}_autofreeze.json": auto}
        for path in args.variants:
            with open(path) as f:
                recipes[os.path.basename(path)] = {**auto, **json.load(f)}
        for seed in args.seeds:
            a = run({**full, "seed": seed}, os.path.join(args.out, f"{task}-full-{seed}"))
            for name, recipe in recipes.items():
                b = run({**recipe, "seed": seed}, os.path.join(args.out, f"{task}-{name}-{seed}"))
                rows.append({"task": task, "seed": seed, "recipe": name, "full": a, "autofreeze": b})
    with open(os.path.join(ROOT, "benchmarks", "results", f"{results_name}.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = [
        "# Automatic freezing with the activation cache against the full fine-tune (one run, side by side)",
        "",
        f"`python benchmarks/auto_freeze_glue.py {' '.join(sys.argv[1:])}` on this machine (2 cores, MiniLM-L6).",
        "",
        "| task | seed | recipe | full: score, train s, wall s | autofreeze + cache: score, train s, wall s | "
        "speed-up (wall) | train-time speed-up | steps at which blocks froze |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        metric = SCORE[row["task"]]
        a, b = row["full"], row["autofreeze"]
        lines.append(
            f"| {row['task']} | {row['seed']} | {row['recipe']} | "
            f"{a['results'][metric]:.4f}, {a['train_s']:.0f}, {a['wall_s']:.0f} | "
            f"{b['results'][metric]:.4f}, {b['train_s']:.0f}, {b['wall_s']:.0f} | {a['wall_s'] / b['wall_s']:.2f}x | "
            f"{a['train_s'] / b['train_s']:.2f}x | {', '.join(map(str, b['froze_at'])) or 'none'} |"
        )
    for task, name in dict.fromkeys((r["task"], r["recipe"]) for r in rows):
        runs = [r for r in rows if (r["task"], r["recipe"]) == (task, name)]
        if len(runs) > 1:
            metric = SCORE[task]
            ratios = [r["full"]["wall_s"] / r["autofreeze"]["wall_s"] for r in runs]
            full = [r["full"]["results"][metric] for r in runs]
            auto = [r["autofreeze"]["results"][metric] for r in runs]
            lines.append(
                f"\n{name}, {len(runs)} seeds: speed-up {statistics.mean(ratios):.2f} +- "
                f"{statistics.stdev(ratios):.2f}; "
                f"{metric} {statistics.mean(auto):.4f} +- {statistics.stdev(auto):.4f} against the full fine-tune's "
                f"{statistics.mean(full):.4f} +- {statistics.stdev(full):.4f}"
            )
    for task in args.tasks:
        png = f"{results_name}.png" if len(args.tasks) == 1 else f"{results_name}_{task}.png"
        plot(next(r for r in rows if r["task"] == task), os.path.join(HERE, "results", png))
        lines.append(f"\n![{task}: per-layer gradient norms, freezing decisions and step time]({png})")
    with open(os.path.join(ROOT, "benchmarks", "results", f"{results_name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
