"""Two DDP processes (torchrun, gloo, CPU): gradual unfreezing with LLRD equals one process, and the noise scale
of each process is the estimator computed by hand from the micro-batches it saw."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "..", "helpers", "ddp_schedules.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def run(tmp_path, mode: str, name: str, batch: int, processes: int) -> list[dict]:
    out = str(tmp_path / name / "run")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launch if processes > 1 else [sys.executable]), WORKER, mode, out, str(batch)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(processes)]


def test_gradual_unfreezing_under_two_processes_equals_one(tmp_path):
    two = run(tmp_path, "unfreeze", "two", batch=2, processes=2)
    (one,) = run(tmp_path, "unfreeze", "one", batch=4, processes=1)
    for name, value in one["state"].items():
        # Blocks unfrozen after DDP wrapped the model are averaged by GradTrainer: every process holds the same.
        torch.testing.assert_close(two[1]["state"][name], two[0]["state"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(two[0]["state"][name], value, rtol=0, atol=5e-6, msg=name)
    blocks = {h["step"]: h["unfrozen_blocks"] for h in two[0]["logs"] if "unfrozen_blocks" in h}
    assert blocks == {1: 0, 2: 1, 3: 1, 4: 2, 5: 2, 6: 3}


def estimate(windows, beta: float, weight: torch.Tensor, bias: torch.Tensor) -> list[float]:
    """The bias-corrected moving-average estimator by hand; `windows` = [(first micro-batch, whole window)]."""

    def grad(batch):
        x, y = (t.double() for t in batch)
        residual = x @ weight + bias - y
        return torch.cat([residual[:, None] * x, residual[:, None]], dim=1).mean(0)

    averages, values = torch.zeros(2, dtype=torch.float64), []
    for step, (small_batch, big_batch) in enumerate(windows, start=1):
        b, big_b = len(small_batch[1]), len(big_batch[1])
        small, big = grad(small_batch).square().sum(), grad(big_batch).square().sum()
        g2 = (big_b * big - b * small) / (big_b - b)
        trace = (small - big) / (1 / b - 1 / big_b)
        averages = beta * averages + (1 - beta) * torch.stack([g2, trace])
        corrected = averages / (1 - beta**step)
        values.append(float(corrected[1] / corrected[0]))
    return values


def test_noise_scale_under_two_processes_uses_one_process_micro_batch(tmp_path):
    ranks = run(tmp_path, "noise", "two", batch=4, processes=2)
    weight = ranks[0]["state"]["linear.weight"].double()[0]
    bias = ranks[0]["state"]["linear.bias"].double()
    for rank in ranks:
        seen = rank["seen"]
        assert len(seen) == 8 and all(len(y) == 4 for _, y in seen)  # 4 steps x 2 micro-batches of 4 rows
        windows = []
        for step in range(4):
            parts = [r["seen"][i] for i in (2 * step, 2 * step + 1) for r in ranks]
            window = (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
            windows.append((seen[2 * step], window))  # B_small: this process's first micro-batch, 4 of 16 rows
        logged = [h["grad_noise_scale"] for h in rank["logs"] if "grad_noise_scale" in h]
        assert logged == pytest.approx(estimate(windows, 0.95, weight, bias), rel=1e-4)
