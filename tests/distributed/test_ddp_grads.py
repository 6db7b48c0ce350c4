"""A block unfrozen after DDP wrapped the model: `all_reduce_grads_` gives every process the full-batch gradient."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hf_gradtools.distributed import all_reduce_grads_

HELPERS = os.path.join(os.path.dirname(__file__), "..", "helpers")


def test_single_process_is_a_no_op():
    layer = torch.nn.Linear(2, 1)
    layer.weight.grad = torch.ones(1, 2)
    assert all_reduce_grads_(layer.parameters()) == 0
    assert torch.equal(layer.weight.grad, torch.ones(1, 2))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_get_the_full_batch_gradient(tmp_path):
    out = str(tmp_path / "grads")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = os.path.join(HELPERS, "ddp_unfreeze.py")
    processes = [
        subprocess.Popen([sys.executable, worker, out, str(rank), "2"], env=env, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in processes:  # one failed: do not leave the other waiting for it
            if process.poll() is None:
                process.kill()
                process.communicate()

    sys.path.insert(0, HELPERS)
    try:
        from ddp_unfreeze import model_and_batch
    finally:
        sys.path.remove(HELPERS)
    model, x, y = model_and_batch()
    torch.nn.functional.mse_loss(model(x), y).backward()
    ranks = [torch.load(f"{out}.{rank}.pt") for rank in range(2)]
    assert not torch.allclose(ranks[0]["local"], ranks[1]["local"])  # what DDP alone leaves behind
    for result in ranks:
        assert result["count"] == 2  # weight and bias of the unfrozen layer
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], param.grad, rtol=1e-6, atol=1e-7, msg=name)
