"""Two DDP processes (torchrun, gloo, CPU) train exactly as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "..", "helpers", "ddp_train.py")


def run(cmd, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one(tmp_path):
    two, one = str(tmp_path / "two" / "w.pt"), str(tmp_path / "one" / "w.pt")
    # Window: 2 processes x batch 2 x accumulation 2 = 8 rows whose label-token counts differ per process.
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # rendezvous on a free local port that torchrun picks itself
            "--nproc_per_node",
            "2",
            WORKER,
            two,
            "2",
            "2",
        ],
        tmp_path,
    )
    run([sys.executable, WORKER, one, "4", "2"], tmp_path)
    a, b = torch.load(two), torch.load(one)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-6)
    for name, value in b["state"].items():
        torch.testing.assert_close(a["state"][name], value, rtol=0, atol=5e-6, msg=name)
