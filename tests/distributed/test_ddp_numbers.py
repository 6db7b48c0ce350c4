"""2-process DDP (torchrun, gloo, CPU): GradTrainer logs the loss and grad_norm of one process with the same
global batch, where the plain Trainer doubles both; a checkpoint of the 2-process run resumes in one process, with a
warning, to the weights the 2-process run reached."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from hf_gradtools import GradTrainer, GradTrainingArguments

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "benchmarks", "ddp_vs_trainer.py")


def load_script():
    spec = importlib.util.spec_from_file_location("ddp_vs_trainer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_log_the_one_process_numbers_and_resume_in_one(tmp_path, caplog):
    out, result = tmp_path / "out", tmp_path / "result.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT]
    done = subprocess.run(
        [*cmd, "--json", str(result), "--out", str(out), "--no_reference"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(result.read_text())["world2"]
    script = load_script()  # the one-process run of the script, here in the test's process
    one = {cls.__name__: script.train(cls, str(tmp_path / cls.__name__), 1) for cls in (Trainer, GradTrainer)}
    assert len(one["GradTrainer"]) == 2
    for a, b in zip(two["GradTrainer"], one["GradTrainer"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(one["Trainer"], one["GradTrainer"], strict=True):  # one process: the Trainer agrees
        assert a == pytest.approx(b, rel=1e-5)
    first, reference = two["Trainer"][0], one["GradTrainer"][0]
    assert first["loss"] == pytest.approx(2 * reference["loss"], rel=1e-5)  # the plain Trainer under DDP: x2
    assert first["grad_norm"] == pytest.approx(2 * reference["grad_norm"], rel=1e-5)

    # Resume the 2-process run's step-1 checkpoint in one process with batch 4: the same rows per step.
    args = script.make_args(GradTrainingArguments, str(tmp_path / "resumed"), world=1, save=False)
    trainer = GradTrainer(model=script.build_model(), args=args, train_dataset=script.dataset())
    saved = out / "world2" / "GradTrainer"
    # A default run records no settings file (its checkpoints hold the Trainer's files alone), so no world-size
    # warning here: `tests/checkpoints/test_checkpoints.py` checks that warning on a recorded checkpoint.
    trainer.train(resume_from_checkpoint=str(saved / "checkpoint-1"))
    final = load_file(str(saved / "checkpoint-2" / "model.safetensors"))
    for name, value in trainer.model.state_dict().items():
        if name in final:
            torch.testing.assert_close(value, final[name], rtol=0, atol=1e-6, msg=name)
