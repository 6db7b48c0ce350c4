"""What the gradient tools need from `torch.distributed`: sharded gradients, agreement, late gradient reduction.

- `is_sharded` / `local_tensor`: FSDP2 gives DTensor gradients; in-place work acts on each local shard.
- `agree_across_ranks`: a flag OR-ed over every process, so each decides alike (the guards' skips).
- `broadcast_from_main_`: the main process's numbers on every process (automatic freezing's decisions).
- `all_reduce_grads_`: average the gradients of parameters that DDP does not reduce, those unfrozen after
  wrapping.

`DistributedDataParallel` registers only the parameters with `requires_grad=True` when it wraps the model; a
parameter unfrozen later gets its gradient on each process but never all-reduced, so the processes drift apart.
`all_reduce_grads_` averages them, as DDP would have: call it once per optimizer step, after the last
micro-batch's backward and before clipping, with `GradualUnfreezer.unfrozen_parameters(model)`. One flat buffer
per device and dtype, one `all_reduce` each.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 1)
    >>> layer.weight.grad = torch.ones(1, 2)
    >>> all_reduce_grads_(layer.parameters())  # a single process (or no process group): nothing to do
    0
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without DTensor
    DTensor = None


def is_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any of `tensors` is a DTensor (FSDP2's sharded parameters and gradients)."""
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def local_tensor(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The local shard of each DTensor (sharing its storage, so in-place ops reach the DTensor); others as they are."""
    return [t.to_local() if DTensor is not None and isinstance(t, DTensor) else t for t in tensors]


def agree_across_ranks(flag: torch.Tensor) -> torch.Tensor:
    """`flag` OR-ed over every process of the default group (all-reduce MAX), so all ranks decide alike.

    Without an initialised `torch.distributed` group, or with one process, returns `flag` as it is. The flag must
    be on a device the backend reduces (CUDA for NCCL, CPU for gloo): where the gradients are.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return flag
    value = flag.to(torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.bool()


def broadcast_from_main_(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` overwritten in place by the main process's (rank 0's) copy, so that every process decides from the
    same numbers; returned. Without an initialised group, or with one process, left as it is. The tensor must be
    on a device the backend reaches (CUDA for NCCL, CPU for gloo)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def all_reduce_grads_(parameters: Iterable[torch.Tensor], group=None) -> int:
    """Replace each `.grad` of `parameters` by its mean over the processes of `group`; return how many it averaged.

    Parameters without a gradient are skipped, so every process must have gradients for the same parameters (true
    for unfrozen blocks, which every process runs). Without an initialised process group, or with one process,
    nothing happens and 0 is returned.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0
    world_size = dist.get_world_size(group)
    buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for param in parameters:
        if param.grad is not None:
            buckets[(param.grad.device, param.grad.dtype)].append(param.grad)
    for grads in buckets.values():
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(world_size)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
    return sum(len(grads) for grads in buckets.values())
