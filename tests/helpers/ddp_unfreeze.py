"""Worker for test_ddp_grads.py: a block unfrozen after DDP wrapped the model, its gradients averaged by hand.

Started twice, `python THIS OUT RANK 2`: the processes meet through the file OUT.store (no port to pick), each takes
its half of one fixed batch of 8 rows and saves the gradients to OUT.<rank>.pt.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import sys

import torch
import torch.distributed as dist


def load_all_reduce_grads_():
    """`all_reduce_grads_` from its file: it needs only torch, and the package would import transformers (seconds)."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "hf_gradtools", "distributed.py")
    spec = importlib.util.spec_from_file_location("distributed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.all_reduce_grads_


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    return model, x, x.sum(1, keepdim=True)


def main(out: str, rank: int, world: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.abspath(out)}.store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    model, x, y = model_and_batch()
    model[0].requires_grad_(False)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    model[0].requires_grad_(True)  # unfrozen after wrapping: DDP does not reduce it
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    torch.nn.functional.mse_loss(ddp(x[rows]), y[rows]).backward()
    local = model[0].weight.grad.clone()
    count = load_all_reduce_grads_()(model[0].parameters())
    grads = {name: p.grad for name, p in model.named_parameters()}
    torch.save({"local": local, "count": count, "grads": grads}, f"{out}.{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as conftest.exit_without_teardown: interpreter shutdown can hang on gloo's threads
