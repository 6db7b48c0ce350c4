"""AGC and gradient-tensor saving on FSDP2 (DTensor) gradients equal the unsharded results: two gloo processes."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WORKER = os.path.join(ROOT, "tests", "helpers", "fsdp2_agc.py")


def test_agc_on_sharded_gradients_equals_unsharded(tmp_path):
    out = tmp_path / "result.txt"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, str(out)]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    worst, clipped, tensors_equal = out.read_text().split()
    assert tensors_equal == "1", "gathered gradient tensors must equal the full gradients"
    assert int(clipped) > 0, "the comparison must cover clipped units"
    assert float(worst) < 1e-5  # without the cross-process sum of a split unit's squares: about 0.1
