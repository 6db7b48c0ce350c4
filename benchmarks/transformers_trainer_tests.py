"""Run transformers' own Trainer tests with `Trainer` replaced by `GradTrainer` (the drop-in check).

transformers' test folder is not part of this repository: get it from a checkout of transformers at the installed
version, then, from the folder that holds its `tests/` package (offline, on a CPU):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 python \\
        HF_GRADTOOLS/benchmarks/transformers_trainer_tests.py --swap both tests/trainer/test_trainer_checkpointing.py

Every other argument is passed to pytest; this repository's `hf_gradtools` is the one imported. Before collection,
`transformers.Trainer` becomes a subclass of `GradTrainer` and `transformers.TrainingArguments` a subclass of
`GradTrainingArguments` (`--swap trainer` swaps the trainer only, `--swap none` runs the plain Trainer), so every
test module that imports them from `transformers` gets the gradient tools at their defaults. The subclasses keep
the original names, so messages and `repr`s read as before.

`--swap both` runs the plain Trainer and the swap, each in a process of its own, and lists the tests whose outcome
differs. One process per run matters: transformers logs some messages with `warning_once` (cached for the process),
so a test that asserts such a message fails when it runs a second time in one process, with either trainer.
Results: `benchmarks/results/transformers_trainer_tests.md`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def swap_trainer_classes(swap: str) -> None:
    """Rebind `transformers.Trainer` (and `TrainingArguments` for `swap="all"`) to GradTrainer's classes."""
    if swap == "none":
        return
    # After that import: loading `transformers.trainer` can put a new `transformers` module in `sys.modules`.
    import transformers

    from hf_gradtools import GradTrainer, GradTrainingArguments

    transformers.Trainer = type("Trainer", (GradTrainer,), {"__module__": GradTrainer.__module__})
    if swap == "all":
        # A dataclass subclass of a dataclass keeps its fields; `__module__` for pickling `training_args.bin`.
        transformers.TrainingArguments = type("TrainingArguments", (GradTrainingArguments,), {"__module__": __name__})
        globals()["TrainingArguments"] = transformers.TrainingArguments


class SwapPlugin:
    """Applies the swap in `pytest_configure`, before any test module is imported."""

    def __init__(self, swap: str):
        self.swap = swap

    def pytest_configure(self, config) -> None:
        swap_trainer_classes(self.swap)

    def pytest_report_header(self, config) -> str:
        return f"transformers.Trainer swapped for GradTrainer: {self.swap}"


def outcomes(junit_xml: str) -> dict[str, str]:
    """`classname::name` -> passed, failed, error or skipped, from a pytest JUnit XML report."""
    results = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        kind = kinds[0] if kinds else "passed"
        results[f"{case.get('classname')}::{case.get('name')}"] = "failed" if kind == "failure" else kind
    return results


def compare(pytest_args: list[str]) -> int:
    """Run the plain Trainer and the swap in two processes; print the counts and the tests that differ."""
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        for swap in ("none", "all"):
            report = os.path.join(folder, f"{swap}.xml")
            command = [sys.executable, os.path.abspath(__file__), "--swap", swap, f"--junitxml={report}", "-q"]
            subprocess.run([*command, *pytest_args], check=False, stdout=subprocess.DEVNULL)
            runs[swap] = outcomes(report)
    for swap, label in (("none", "Trainer"), ("all", "GradTrainer")):
        counts = {kind: list(runs[swap].values()).count(kind) for kind in ("passed", "failed", "error", "skipped")}
        print(f"{label:12s}" + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    lost = sorted(t for t, kind in runs["none"].items() if kind == "passed" and runs["all"].get(t) != "passed")
    gained = sorted(t for t, kind in runs["all"].items() if kind == "passed" and runs["none"].get(t) != "passed")
    print(f"passed with Trainer, not with GradTrainer: {len(lost)}", *lost, sep="\n  ")
    print(f"passed with GradTrainer, not with Trainer: {len(gained)}", *gained, sep="\n  ")
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--swap", choices=["all", "trainer", "none", "both"], default="all")
    args, pytest_args = parser.parse_known_args(argv)
    if args.swap == "both":
        return compare(pytest_args)
    return pytest.main(["-p", "no:cacheprovider", *pytest_args], plugins=[SwapPlugin(args.swap)])


if __name__ == "__main__":
    sys.exit(main())
