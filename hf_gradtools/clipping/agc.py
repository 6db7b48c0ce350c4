"""AGC, adaptive gradient clipping: each unit's gradient rescaled relative to its weights (`clip_algorithm="agc"`).

Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without Normalization"
(ICML 2021). Every unit's gradient `G_u` is rescaled, where needed, so that
`||G_u|| <= clip_factor * max(||W_u||, eps)`, all norms L2. A unit is one output row: index `i` along dim 0 of a
parameter with two or more dims (a `Linear`'s output feature; a conv's output channel, its norm over all other
dims), and the whole tensor for biases and other parameters of one dim or none. Weights stored input-first, like
transformers' `Conv1D` in GPT-2, have their output units along the last dim: list them in `transposed`
(`transposed_weights(model)` finds them). The paper leaves the final classifier layer unclipped;
`default_agc_exclude(model)` gives patterns for the task head (`hf_gradtools.layout.head_parameter_names`).
`AgcClip` is the registered algorithm `agc`: these functions with the run's settings.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    ...     _ = layer.bias.copy_(torch.tensor([1.0, 0.0]))
    >>> layer.weight.grad = torch.tensor([[0.3, 0.4], [0.0, 0.1]])
    >>> layer.bias.grad = torch.tensor([0.001, 0.0])
    >>> result = agc_clip_(layer.named_parameters(), clip_factor=0.01, eps=1e-3)
    >>> layer.weight.grad  # row 0 to norm 0.01 * 5; row 1 to 0.01 * eps (its weights are 0)
    tensor([[3.0000e-02, 4.0000e-02],
            [0.0000e+00, 1.0000e-05]])
    >>> result.num_units, int(result.num_clipped)  # the bias (norm 0.001 <= 0.01 * 1) is left alone
    (3, 2)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import local_tensor
from ..errors import shown_setting
from ..layout import head_parameter_names
from ..patterns import compile_patterns
from .norm import Partial, Shard, grad_norms, total_norm
from .registry import ClipAlgorithm, register_clip_algorithm

# Floor of a unit's gradient norm before dividing by it (a zero gradient needs no clipping).
_GRAD_NORM_FLOOR = 1e-6


def _check_positive(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{field}` must be a positive finite number, got {shown_setting(value)}.")
    return float(value)


def check_agc_settings(
    clip_factor: float, eps: float, exclude: Iterable[str] | None = None
) -> tuple[float, float, list[re.Pattern]]:
    """Validate AGC's settings as `agc_clip_` does (for an arguments class's `__post_init__`).

    Returns `(clip_factor, eps, compiled exclude patterns)`; raises a `ValueError` naming `agc_clip_factor`,
    `agc_eps` or `agc_exclude`.
    """
    return (
        _check_positive(clip_factor, "agc_clip_factor"),
        _check_positive(eps, "agc_eps"),
        compile_patterns(exclude or (), "agc_exclude"),
    )


@dataclass
class AgcResult:
    """What `agc_clip_` did. Tensors stay on the device: reading them is the caller's host sync.

    Attributes:
        num_units: how many units (rows, or whole 1-D tensors) were checked; excluded parameters not counted.
        num_clipped: 0-d integer tensor, how many of them were rescaled.
        total_norm_post_clip: the `norm_type` norm of all gradients after clipping (excluded ones included), or
            `None` when `agc_clip_` was given no `norm_type`.
    """

    num_units: int
    num_clipped: torch.Tensor
    total_norm_post_clip: torch.Tensor | None


def _unit_norms(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    """L2 norm of each unit, shaped to broadcast against `tensor` (its local shard, for a DTensor), in float32.

    An FSDP2 shard (DTensor) holds whole units when it is split along the unit dimension (rows, by default): its
    norms are local. A unit split across processes (a 1-D tensor, or a transposed weight) sums its squares over the
    processes that hold it, with one all-reduce per sharded mesh dimension.
    """
    unit_dim = None if tensor.ndim <= 1 else (tensor.ndim - 1 if transposed else 0)
    local = local_tensor([tensor])[0]
    if unit_dim is None:
        dims, keepdim = tuple(range(local.ndim)), False
    else:
        dims, keepdim = tuple(d for d in range(local.ndim) if d != unit_dim), True
    if local is tensor:
        return torch.linalg.vector_norm(tensor, dim=dims or None, keepdim=keepdim, dtype=torch.float32)
    squares = local.float().pow(2).sum(dim=dims, keepdim=keepdim) if dims else local.float().pow(2)
    for mesh_dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Partial):
            raise ValueError(f"AGC cannot clip a tensor with a pending reduction (placements {tensor.placements}).")
        if isinstance(placement, Shard) and placement.dim != unit_dim:
            torch.distributed.all_reduce(squares, group=tensor.device_mesh.get_group(mesh_dim))
    return squares.sqrt()


def agc_clip_(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    exclude: Iterable[str] = (),
    norm_type: float | None = None,
    transposed: Iterable[str] = (),
) -> AgcResult:
    """Clip the `.grad` of `named_parameters` unit-wise in place, relative to each unit's weight norm (AGC).

    Per unit: `max_norm = clip_factor * max(||W_u||, eps)`; where `||G_u|| > max_norm`,
    `G_u *= max_norm / ||G_u||`. No host sync: every decision is a multiply by a device-side factor (1 where the
    unit is within bounds, which leaves it bit for bit as it was).

    Args:
        named_parameters: `(name, parameter)` pairs, e.g. `model.named_parameters()`; those without `.grad` are
            skipped.
        clip_factor: `lambda` of the paper, positive (`agc_clip_factor`).
        eps: floor of the weight norm, positive (`agc_eps`), so that zero-initialised weights can still move.
        exclude: regex name patterns (`re.search`) of parameters left unclipped, e.g. `default_agc_exclude(model)`.
        norm_type: if given, also return the total norm after clipping in this norm (one fused norm pass).
        transposed: names of weights stored input-first (output units along the last dim).

    Returns:
        `AgcResult`.
    """
    clip_factor, eps, regexes = check_agc_settings(clip_factor, eps, exclude)
    transposed = set(transposed)
    grads, clipped, num_units, device = [], [], 0, None
    for name, param in named_parameters:
        grad = param.grad
        if grad is None:
            continue
        grads.append(grad)
        local = local_tensor([grad])[0]  # FSDP2 (DTensor): this process's shard, sharing the gradient's storage
        device = device or local.device
        if any(regex.search(name) for regex in regexes):
            continue
        is_transposed = name in transposed
        max_norm = _unit_norms(param.detach(), is_transposed).clamp_min(eps) * clip_factor
        norm = _unit_norms(grad, is_transposed)
        local.mul_((max_norm / norm.clamp_min(_GRAD_NORM_FLOOR)).clamp(max=1.0).to(local.dtype))
        clipped.append((norm > max_norm).sum().to(device))
        num_units += norm.numel()
    device = device or torch.device("cpu")
    num_clipped = torch.stack(clipped).sum() if clipped else torch.zeros((), dtype=torch.long, device=device)
    post = total_norm(grad_norms(grads, norm_type), norm_type) if norm_type is not None else None
    return AgcResult(num_units=num_units, num_clipped=num_clipped, total_norm_post_clip=post)


def transposed_weights(model: nn.Module) -> list[str]:
    """Names of the weights that transformers' `Conv1D` (GPT-2 and kin) stores as `(in, out)`.

    Example:
        >>> from transformers import GPT2Config, GPT2Model
        >>> model = GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=10, n_positions=8))
        >>> transposed_weights(model)[:2]
        ['h.0.attn.c_attn.weight', 'h.0.attn.c_proj.weight']
    """
    names = []
    for module_name, module in model.named_modules():
        if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def default_agc_exclude(model: nn.Module) -> list[str]:
    """Anchored regex patterns (`^name$`) of `head_parameter_names(model)`: AGC's default exclusion."""
    return [f"^{re.escape(name)}$" for name in head_parameter_names(model)]


@register_clip_algorithm("agc")
class AgcClip(ClipAlgorithm):
    """`agc_clip_` as a registered algorithm: `agc_clip_factor`, `agc_eps`, and `agc_exclude` (empty: the model's
    task head, `default_agc_exclude`); the weights that `Conv1D` stores input-first are found in the model.
    `max_grad_norm` is not used. Keeps no state."""

    def __init__(
        self,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        exclude: Iterable[str] = (),
        transposed: Iterable[str] = (),
    ):
        self.clip_factor, self.eps = clip_factor, eps
        self.exclude, self.transposed = list(exclude), list(transposed)

    @classmethod
    def from_args(cls, args, model: nn.Module | None = None) -> AgcClip:
        exclude = args.agc_exclude or (default_agc_exclude(model) if model is not None else [])
        transposed = transposed_weights(model) if model is not None else []
        return cls(args.agc_clip_factor, args.agc_eps, exclude, transposed)

    def clip(self, named_parameters, norm_type):
        result = agc_clip_(
            named_parameters, self.clip_factor, self.eps, self.exclude, norm_type=norm_type, transposed=self.transposed
        )
        return result.total_norm_post_clip
