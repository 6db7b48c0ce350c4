"""examples/glue_results.py: the table on disk grows run by run, so a sweep killed midway keeps what it finished."""

from __future__ import annotations

import json
import os

import pytest

from tests.examples.test_run_glue import ROOT, _load_script

glue_results = _load_script("glue_results", os.path.join(ROOT, "examples", "glue_results.py"))


def fake_run(metrics_by_seed: dict[int, float], stop_at_seed: int):
    """Stands in for one `run_glue.py` process: writes the files `collect` reads, or stops the sweep."""

    def run_and_measure(command, log_path, threads=None):
        seed = int(command[command.index("--seed") + 1])
        if seed == stop_at_seed:
            raise KeyboardInterrupt  # the sweep is killed while this run trains
        out = os.path.dirname(log_path)
        results = {"eval_accuracy": metrics_by_seed[seed], "train_runtime": 10.0, "train_samples_per_second": 5.0,
                   "train_samples": 50, "eval_samples": 20, "eval_top_class_share": 0.6}  # fmt: skip
        with open(os.path.join(out, "all_results.json"), "w") as f:
            json.dump(results, f)
        with open(os.path.join(out, "frozen_parameters.json"), "w") as f:
            json.dump({"num_trainable": 30, "num_frozen": 70}, f)
        return 0, 12.0, 900.0

    return run_and_measure


def test_a_killed_sweep_keeps_the_runs_it_finished(tmp_path, monkeypatch):
    monkeypatch.setattr(glue_results, "run_and_measure", fake_run({42: 0.80, 43: 0.90}, stop_at_seed=44))
    monkeypatch.setattr(glue_results.subprocess, "run", lambda *a, **k: None)  # no plots of the fake runs
    out = str(tmp_path / "sweep")
    argv = ["--tasks", "sst2", "--setups", "full", "--seeds", "42", "43", "44", "--output_dir", out]
    with pytest.raises(KeyboardInterrupt):
        glue_results.main(argv)
    with open(os.path.join(out, "results.json")) as f:
        runs = json.load(f)["runs"]
    assert [(r["seed"], r["metrics"]["accuracy"]) for r in runs] == [(42, 0.80), (43, 0.90)]
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    # mean 0.85, sample sd of (0.80, 0.90) = 0.0707; 30 of 100 parameters trainable
    assert "| SST-2 | full fine-tune | 0.0001 | acc 0.850 ± 0.071 | 2 | 10 | 5.0 | 0.00M (30%) | 900 |" in table
    assert "seeds 42, 43;" in table
    assert sorted(os.listdir(out)) == ["results.json", "results.md"] + [f"sst2-full-seed{s}" for s in (42, 43, 44)]
