"""Gradient clipping by value and by norm, in any norm type, that keeps the per-parameter norms it computes.

`clip_gradients` gives the same gradients as `torch.nn.utils.clip_grad_value_` followed by
`torch.nn.utils.clip_grad_norm_`, and returns what a logger or a snapshot needs: the norm of each gradient and
the total norm before and after clipping. The per-parameter norms come from one fused `torch._foreach_norm` call
per device and dtype, the same kernels `clip_grad_norm_` runs, so keeping them costs nothing extra.

Order, when both are set: each element is first clamped to `[-clip_value, clip_value]`, then the whole
gradient is rescaled to a total norm of at most `max_norm`. Clamping first keeps one outlier element from
shrinking every other gradient; either order leaves both bounds satisfied.

Gradients sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`) are DTensors. For them every norm is the global
one: each process takes the norms of its local shards with the same fused kernels, and one all-reduce per group of
gradients sharded alike (over the mesh dimensions they are sharded on) combines them: the sum of p-th powers for a
finite p, the maximum for inf. Clamping and rescaling act on the local shards. Every process must call with the
same parameters in the same order, as it does for any collective. Plain tensors take the path they always took.

`NormClip` is the registered algorithm `norm` (the default): `max_grad_norm` in `clip_norm_type`.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 1)
    >>> layer.weight.grad, layer.bias.grad = torch.tensor([[3.0, 4.0]]), torch.tensor([0.0])
    >>> result = clip_gradients(layer.parameters(), max_norm=1.0, norm_type=2.0)
    >>> round(result.total_norm.item(), 4), round(result.total_norm_post_clip.item(), 4)
    (5.0, 1.0)
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from ..distributed import is_sharded, local_tensor
from .registry import ClipAlgorithm, register_clip_algorithm

try:
    from torch.distributed.tensor import DTensor, Partial, Shard
except ImportError:  # a build of torch without torch.distributed
    DTensor = Partial = Shard = None

# `torch.nn.utils.clip_grad_norm_` adds this to the total norm before dividing; kept identical so results match.
_EPS = 1e-6


@dataclass
class ClipResult:
    """What `clip_gradients` measured. All tensors stay on the device: reading them is the caller's host sync.

    Attributes:
        param_norms: 1-D tensor, the norm of each gradient before any clipping, in the order given.
        total_norm: the norm of all gradients as one vector, before any clipping.
        total_norm_post_clip: the same norm after clipping.
    """

    param_norms: torch.Tensor
    total_norm: torch.Tensor
    total_norm_post_clip: torch.Tensor


def check_norm_type(norm_type: float | str, field: str = "norm_type") -> float:
    """Return `norm_type` as a float, or raise a `ValueError` naming `field` if it is not positive or inf."""
    value = norm_type
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ValueError(f"`{field}` must be a positive number or 'inf' (infinity norm), got {norm_type!r}.")
    return float(value)


def _grouped(tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, tensor in enumerate(tensors):
        groups[(tensor.device, tensor.dtype)].append(i)
    return groups


def _reduction_key(grad: torch.Tensor) -> tuple:
    """What a norm of `grad` must be reduced over: `()` for a whole tensor, else its mesh and sharded mesh dims."""
    if not isinstance(grad, DTensor):
        return ()
    if any(isinstance(p, Partial) for p in grad.placements):
        raise ValueError(
            f"Gradients with a pending reduction (placements {grad.placements}) cannot be clipped shard by shard; "
            "redistribute them to Shard or Replicate placements first."
        )
    dims = tuple(i for i, p in enumerate(grad.placements) if isinstance(p, Shard))
    return (grad.device_mesh, dims) if dims else ()


def _sharded_grad_norms(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """`grad_norms` for a list holding DTensors: local norms, then one all-reduce per reduction group."""
    local = local_tensor(grads)
    nonempty = [i for i, g in enumerate(local) if g.numel() > 0]
    device = local[nonempty[0] if nonempty else 0].device  # where `grad_norms` puts the local norms
    zero = torch.zeros((), device=device, dtype=torch.float32)  # an empty shard has norm 0
    norms = [zero] * len(grads)
    if nonempty:
        for i, value in zip(nonempty, grad_norms([local[i] for i in nonempty], norm_type).unbind(), strict=True):
            norms[i] = value
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, grad in enumerate(grads):
        groups[_reduction_key(grad)].append(i)
    for key, indices in groups.items():
        if not key:
            continue  # whole tensors: every process holds the same gradient
        mesh, dims = key
        values = torch.stack([norms[i] for i in indices])
        if math.isinf(norm_type):
            for dim in dims:
                torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX, group=mesh.get_group(dim))
        else:
            values = values.pow(norm_type)
            for dim in dims:
                torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM, group=mesh.get_group(dim))
            values = values.pow(1.0 / norm_type)
        for i, value in zip(indices, values.unbind(), strict=True):
            norms[i] = value
    return torch.stack(norms)


def grad_norms(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """Norm of each tensor in `grads` as one float32 1-D tensor on the first tensor's device (fused per group).

    No index tensor is copied from the host: only kernels are queued. For DTensors (FSDP2 shards) each norm is
    the global one, reduced across the processes that hold its shards (a collective: every process must call).
    """
    if not grads:
        return torch.zeros(0)
    if is_sharded(grads):
        return _sharded_grad_norms(grads, norm_type)
    device = grads[0].device
    norms: list[torch.Tensor] = [None] * len(grads)  # type: ignore[list-item]
    for (group_device, _), indices in _grouped(grads).items():
        group = [grads[i] for i in indices]
        if group_device.type in ("cpu", "cuda", "xpu", "mps"):
            values = torch._foreach_norm(group, norm_type)
        else:
            values = [torch.linalg.vector_norm(g, norm_type) for g in group]
        for i, value in zip(indices, values, strict=True):
            norms[i] = value
    return torch.stack([n.to(device, torch.float32) for n in norms])


def norms_as_torch_combines(param_norms: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """`param_norms` (float32, in the order of `grads`) as torch's `clip_grad_norm_` combines them, so that the
    total norm, the clipping coefficient and the clipped gradients are torch's to the bit: in the gradients' dtype
    (bf16 or fp16 when all are; the norms are such values already, only the total's rounding changes), and, with
    several devices or dtypes, grouped by them as torch sums them."""
    if not grads or is_sharded(grads):
        return param_norms
    if len(_grouped(grads)) > 1:  # torch's own grouping, whose order is not the order of first appearance
        groups = _group_tensors_by_device_and_dtype([list(grads)], with_indices=True)
        order = [i for _, indices in groups.values() for i in indices]
        param_norms = param_norms[torch.tensor(order, device=param_norms.device)]
    dtype = functools.reduce(torch.promote_types, {g.dtype for g in grads})
    return param_norms.to(dtype) if dtype in (torch.float16, torch.bfloat16) else param_norms


def total_norm(param_norms: torch.Tensor, norm_type: float = 2.0) -> torch.Tensor:
    """Combine per-tensor norms into the norm of all tensors taken as one vector."""
    if param_norms.numel() == 0:
        return torch.zeros((), device=param_norms.device)
    return torch.linalg.vector_norm(param_norms, norm_type)


def _scale_(grads: list[torch.Tensor], factor: torch.Tensor) -> None:
    for (device, _), indices in _grouped(grads).items():
        group = [grads[i] for i in indices]
        torch._foreach_mul_(group, factor.to(device))


def norm_cap(max_norm: float | None) -> float | None:
    """`max_norm` where it caps the norm, else `None`: 0, a negative number, NaN and `None` turn norm clipping off,
    as for the Trainer's `max_grad_norm` (it clips only when `max_grad_norm > 0`)."""
    return float(max_norm) if max_norm is not None and max_norm > 0 else None


def clip_gradients(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    clip_value: float | None = None,
) -> ClipResult:
    """Clip the `.grad` of `parameters` in place and report the norms.

    Args:
        parameters: tensors whose `.grad` to clip; those without a gradient are skipped, as in torch.
        max_norm: rescale so the total `norm_type` norm is at most this; `None`, 0, a negative number or NaN
            skips norm clipping (as the Trainer's `max_grad_norm`).
        norm_type: any positive float, or `float("inf")`.
        clip_value: clamp every element to `[-clip_value, clip_value]` first (a positive finite number); `None`
            skips value clipping.

    Returns:
        `ClipResult` with the norms before (per parameter and total) and after (total) clipping.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    norm_type = check_norm_type(norm_type)
    if clip_value is not None and (
        isinstance(clip_value, bool) or not isinstance(clip_value, (int, float)) or not 0 < clip_value < math.inf
    ):
        raise ValueError(f"`clip_value` must be a positive finite number or None (off), got {clip_value!r}.")
    max_norm = norm_cap(max_norm)
    grads = [p.grad for p in parameters if p.grad is not None]
    param_norms = grad_norms(grads, norm_type)
    pre_clip = total_norm(norms_as_torch_combines(param_norms, grads), norm_type)
    post_clip = pre_clip
    # Element-wise work on DTensors acts on their local shards; `grad_norms` still gets the DTensors to reduce.
    local = local_tensor(grads) if is_sharded(grads) else grads
    if clip_value is not None:
        for grad in local:
            grad.clamp_(-clip_value, clip_value)
        post_clip = total_norm(norms_as_torch_combines(grad_norms(grads, norm_type), grads), norm_type)
    if max_norm is not None:
        coef = torch.clamp(max_norm / (post_clip + _EPS), max=1.0)
        _scale_(local, coef)
        post_clip = post_clip * coef
    return ClipResult(param_norms=param_norms, total_norm=pre_clip, total_norm_post_clip=post_clip)


class TotalNormClipAlgorithm(ClipAlgorithm):
    """An algorithm that acts on the total norm of its gradients: it defines `clip_with_norm`, and `clip` measures
    that norm (in `norm_type`) and calls it."""

    def clip(self, named_parameters, norm_type):
        grads = [p.grad for _, p in named_parameters if p.grad is not None]
        norms = norms_as_torch_combines(grad_norms(grads, norm_type), grads)
        return self.clip_with_norm(named_parameters, norm_type, total_norm(norms, norm_type))

    def clip_with_norm(self, named_parameters, norm_type, norm):
        raise NotImplementedError(
            f"{type(self).__name__} must define clip_with_norm(named_parameters, norm_type, norm)."
        )


@register_clip_algorithm("norm")
class NormClip(TotalNormClipAlgorithm):
    """The total norm scaled to at most `max_norm` (`max_grad_norm`; 0 or less, NaN or `None`: no scaling), as
    `clip_gradients`. Keeps no state."""

    def __init__(self, max_norm: float | None = None):
        self.max_norm = norm_cap(max_norm)

    @classmethod
    def from_args(cls, args, model=None) -> NormClip:
        return cls(args.max_grad_norm)

    def clip_with_norm(self, named_parameters, norm_type, norm):
        if not self.max_norm:
            return norm
        grads = [p.grad for _, p in named_parameters if p.grad is not None]
        coef = torch.clamp(self.max_norm / (norm + _EPS), max=1.0)
        _scale_(local_tensor(grads) if is_sharded(grads) else grads, coef)
        return norm * coef
