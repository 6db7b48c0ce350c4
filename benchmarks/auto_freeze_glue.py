"""End to end, side by side in one run: the full fine-tune against automatic freezing with the activation cache.

For each task, the shipped recipe without any freezing (the full fine-tune) and `recipes/<task>_autofreeze.json`
run one after the other, each in a fresh process, on the same machine; the table gives each run's wall time, its
training time, the validation score and the ratio, and the step at which each block froze.

    python benchmarks/auto_freeze_glue.py [--tasks mrpc sst2] [--seeds 42]

Writes benchmarks/results/auto_freeze_glue_<tasks>.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE = {"mrpc": "eval_f1", "sst2": "eval_accuracy", "cola": "eval_matthews_correlation"}


def run(recipe: dict, out: str) -> dict:
    recipe = {**recipe, "output_dir": out, "dataset_name": os.path.join(ROOT, "..", "shared", "glue")}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(recipe, f)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "run_glue.py"), f.name], check=True, env=env)
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
    return {"wall_s": wall, "train_s": results["train_runtime"], "results": results, "froze_at": froze}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["mrpc", "sst2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "auto_freeze_glue"))
    args = parser.parse_args()
    rows = []
    for task in args.tasks:
        with open(os.path.join(ROOT, "examples", "recipes", f"{task}.json")) as f:
            full = json.load(f)
        full.pop("freeze_embeddings", None)
        full.pop("freeze_first_n_layers", None)
        with open(os.path.join(ROOT, "examples", "recipes", f"{task}_autofreeze.json")) as f:
            auto = json.load(f)
        for seed in args.seeds:
            a = run({**full, "seed": seed}, os.path.join(args.out, f"{task}-full-{seed}"))
            b = run({**auto, "seed": seed}, os.path.join(args.out, f"{task}-autofreeze-{seed}"))
            rows.append({"task": task, "seed": seed, "full": a, "autofreeze": b})
    with open(os.path.join(ROOT, "benchmarks", "results", f"auto_freeze_glue_{'_'.join(args.tasks)}.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = [
        "# Automatic freezing with the activation cache against the full fine-tune (one run, side by side)",
        "",
        f"`python benchmarks/auto_freeze_glue.py --tasks {' '.join(args.tasks)} --seeds "
        f"{' '.join(map(str, args.seeds))}` on this machine (2 cores, MiniLM-L6).",
        "",
        "| task | seed | full: score, train s, wall s | autofreeze + cache: score, train s, wall s | speed-up "
        "(wall) | train-time speed-up | steps at which blocks froze |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        metric = SCORE[row["task"]]
        a, b = row["full"], row["autofreeze"]
        lines.append(
            f"| {row['task']} | {row['seed']} | {a['results'][metric]:.4f}, {a['train_s']:.0f}, {a['wall_s']:.0f} | "
            f"{b['results'][metric]:.4f}, {b['train_s']:.0f}, {b['wall_s']:.0f} | {a['wall_s'] / b['wall_s']:.2f}x | "
            f"{a['train_s'] / b['train_s']:.2f}x | {', '.join(map(str, b['froze_at'])) or 'none'} |"
        )
    for task in args.tasks:
        ratios = [r["full"]["wall_s"] / r["autofreeze"]["wall_s"] for r in rows if r["task"] == task]
        if len(ratios) > 1:
            lines.append(f"\n{task}: speed-up {statistics.mean(ratios):.2f} +- {statistics.stdev(ratios):.2f}")
    with open(os.path.join(ROOT, "benchmarks", "results", f"auto_freeze_glue_{'_'.join(args.tasks)}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
