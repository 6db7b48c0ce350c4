"""A block unfrozen after DDP wrapped the model: `all_reduce_grads_` gives every process the full-batch gradient."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hf_gradtools.schedules import all_reduce_grads_

HELPERS = os.path.join(os.path.dirname(__file__), "helpers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's hf_gradtools, not another


def test_single_process_is_a_no_op():
    layer = torch.nn.Linear(2, 1)
    layer.weight.grad = torch.ones(1, 2)
    assert all_reduce_grads_(layer.parameters()) == 0
    assert torch.equal(layer.weight.grad, torch.ones(1, 2))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_get_the_full_batch_gradient(tmp_path):
    out = str(tmp_path / "grads")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, os.path.join(HELPERS, "ddp_unfreeze.py"), out], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

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
