"""One optimizer step's clipping by `clip_algorithm`: `norm`, `agc` or `autoclip`, each after value clipping.

Order: every element is first clamped to `[-clip_value, clip_value]` (if set), then
- `norm`: the total `norm_type` norm is scaled to at most `max_norm` (`clip_gradients`; 0 or `None`: no scaling);
- `agc`: each unit is scaled relative to its weights (`agc_clip_`); `max_norm` is not used;
- `autoclip`: the total norm is scaled to a percentile of all norms so far (`AutoClip.clip_`); the history
  records the norm AutoClip sees, after value clipping; `max_norm` is not used.

Whatever the algorithm, the result holds the per-parameter norms and the total norm before any clipping (what the
Trainer logs as `grad_norm` and snapshots record) and the total norm after all of it, all in `norm_type`.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 1)
    >>> layer.weight.grad, layer.bias.grad = torch.tensor([[3.0, 4.0]]), torch.tensor([0.0])
    >>> result = clip_with_algorithm(layer.named_parameters(), "norm", max_norm=1.0)
    >>> round(result.total_norm.item(), 4), round(clip_coefficient(result).item(), 4)
    (5.0, 0.2)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .adaptive_clipping import AutoClip, agc_clip_
from .clipping import ClipResult, check_norm_type, clip_gradients

CLIP_ALGORITHMS = ("norm", "agc", "autoclip")


def check_clip_algorithm(value: str) -> str:
    """Return `value` if it is one of `CLIP_ALGORITHMS`, else raise a `ValueError` naming `clip_algorithm`."""
    if value not in CLIP_ALGORITHMS:
        allowed = ", ".join(repr(a) for a in CLIP_ALGORITHMS)
        raise ValueError(f"`clip_algorithm` must be one of {allowed}, got {value!r}.")
    return value


def clip_with_algorithm(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    algorithm: str = "norm",
    *,
    norm_type: float = 2.0,
    clip_value: float | None = None,
    max_norm: float | None = None,
    agc_clip_factor: float = 0.01,
    agc_eps: float = 1e-3,
    agc_exclude: Iterable[str] = (),
    transposed: Iterable[str] = (),
    autoclip: AutoClip | None = None,
) -> ClipResult:
    """Clip the `.grad` of `named_parameters` in place as `algorithm` says; no host sync.

    Args:
        named_parameters: `(name, parameter)` pairs; those without `.grad` are skipped.
        algorithm: `"norm"`, `"agc"` or `"autoclip"`.
        norm_type: norm of the reported norms, and of `norm` clipping.
        clip_value: clamp every element to `[-clip_value, clip_value]` first; `None` skips it.
        max_norm: the bound of `norm` clipping.
        agc_clip_factor, agc_eps, agc_exclude, transposed: as `agc_clip_`'s `clip_factor`, `eps`, `exclude`,
            `transposed`.
        autoclip: the run's `AutoClip` (its history is updated), required for `"autoclip"`.

    Returns:
        `ClipResult`: per-parameter norms and total norm before any clipping, total norm after clipping. Its
        `param_norms` follow the order of the parameters that have a gradient.
    """
    check_clip_algorithm(algorithm)
    norm_type = check_norm_type(norm_type)
    if algorithm == "autoclip" and not isinstance(autoclip, AutoClip):
        raise ValueError(f"`clip_algorithm`='autoclip' needs the run's AutoClip as `autoclip`, got {autoclip!r}.")
    named = [(name, param) for name, param in named_parameters if param.grad is not None]
    params = [param for _, param in named]
    if algorithm == "norm":
        return clip_gradients(params, max_norm=max_norm, norm_type=norm_type, clip_value=clip_value)
    result = clip_gradients(params, max_norm=None, norm_type=norm_type, clip_value=clip_value)
    if algorithm == "agc":
        agc = agc_clip_(
            named, agc_clip_factor, agc_eps, exclude=agc_exclude, norm_type=norm_type, transposed=transposed
        )
        post = agc.total_norm_post_clip
    else:
        post = autoclip.clip_(params, result.total_norm_post_clip).total_norm_post_clip
    return ClipResult(param_norms=result.param_norms, total_norm=result.total_norm, total_norm_post_clip=post)


def clip_coefficient(result: ClipResult) -> torch.Tensor:
    """`total_norm_post_clip / total_norm` (0-d, on the device): 1 where nothing was clipped or the norm is 0, NaN
    where the norm is not finite."""
    pre, post = result.total_norm, result.total_norm_post_clip
    return torch.where(pre == 0, torch.ones_like(pre), post / pre)
