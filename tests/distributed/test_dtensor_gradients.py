"""FSDP2 (DTensor) gradients in one process (a one-rank gloo group, a CPU mesh): the non-finite check reads the
local shards, AutoClip scales them, AGC clips them, gradient tensors are gathered."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hf_gradtools.clipping import AutoClip, agc_clip_
from hf_gradtools.guards import has_nonfinite, nonfinite_names
from hf_gradtools.snapshots.tensors import GradTensorSaver

tensor_api = pytest.importorskip("torch.distributed.tensor")


@pytest.fixture
def mesh(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.device_mesh.init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def sharded_layer(mesh) -> nn.Linear:
    layer = nn.Linear(2, 3)
    for name, param in list(layer.named_parameters()):
        sharded = nn.Parameter(tensor_api.distribute_tensor(param.detach(), mesh, [tensor_api.Shard(0)]))
        sharded.grad = tensor_api.distribute_tensor(torch.ones(param.shape), mesh, [tensor_api.Shard(0)])
        setattr(layer, name, sharded)
    return layer


def test_dtensor_gradients(mesh):
    layer = sharded_layer(mesh)
    grads = [layer.weight.grad, layer.bias.grad]
    assert isinstance(grads[0], tensor_api.DTensor)
    assert not bool(has_nonfinite(grads))
    layer.bias.grad.to_local()[1] = math.nan
    assert bool(has_nonfinite(grads)) and nonfinite_names(["weight", "bias"], grads) == ["bias"]
    layer.bias.grad.to_local()[1] = 1.0

    clipper = AutoClip(percentile=50)
    clipper.load_state_dict({"history": [1.0]})
    clipper.clip_(layer.parameters(), total_norm=torch.tensor(3.0))  # median of [1, 3]: 2
    torch.testing.assert_close(layer.weight.grad.to_local(), torch.full((3, 2), 2.0 / (3.0 + 1e-6)))

    # AGC and gradient tensors work on the shards (two processes: tests/distributed/test_fsdp2_agc.py).
    saved = GradTensorSaver(layer.named_parameters(), ["bias"]).copy(1).tensors
    torch.testing.assert_close(saved["bias"], layer.bias.grad.full_tensor())
    plain = nn.Linear(2, 3)
    with torch.no_grad():
        plain.weight.copy_(layer.weight.full_tensor())
        plain.bias.copy_(layer.bias.full_tensor())
    plain.weight.grad, plain.bias.grad = layer.weight.grad.full_tensor(), layer.bias.grad.full_tensor()
    agc_clip_(plain.named_parameters(), clip_factor=0.05)
    agc_clip_(layer.named_parameters(), clip_factor=0.05)
    torch.testing.assert_close(layer.weight.grad.full_tensor(), plain.weight.grad)
    torch.testing.assert_close(layer.bias.grad.full_tensor(), plain.bias.grad)
