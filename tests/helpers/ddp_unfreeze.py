"""Worker for test_ddp_grads.py: a block unfrozen after DDP wrapped the model, its gradients averaged by hand.

Run under torchrun with 2 processes: `python -m torch.distributed.run --standalone --nproc_per_node 2 THIS OUT`.
Each process takes its half of one fixed batch of 8 rows and saves the gradients to OUT.<rank>.pt.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from hf_gradtools.schedules import all_reduce_grads_


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    return model, x, x.sum(1, keepdim=True)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, x, y = model_and_batch()
    model[0].requires_grad_(False)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    model[0].requires_grad_(True)  # unfrozen after wrapping: DDP does not reduce it
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    torch.nn.functional.mse_loss(ddp(x[rows]), y[rows]).backward()
    local = model[0].weight.grad.clone()
    count = all_reduce_grads_(model[0].parameters())
    grads = {name: p.grad for name, p in model.named_parameters()}
    torch.save({"local": local, "count": count, "grads": grads}, f"{out}.{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
