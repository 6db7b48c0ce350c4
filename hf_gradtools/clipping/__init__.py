"""Gradient clipping: by value and by norm in any norm type (`norm`), AGC (`agc`), AutoClip (`autoclip`), ZClip
(`zclip`), and the registry that adds an algorithm of your own.

    from hf_gradtools.clipping import ClipAlgorithm, register_clip_algorithm

    @register_clip_algorithm("halve")
    class Halve(ClipAlgorithm):
        def clip(self, named_parameters, norm_type):  # (name, parameter) pairs, each with a .grad
            for _, p in named_parameters:
                p.grad.mul_(0.5)

    GradTrainingArguments("out", clip_algorithm="halve")  # or --clip_algorithm halve

One optimizer step's clipping (`clip_by`), whatever the algorithm:
1. the norm of each gradient and their total norm are measured, before any clipping: the logged `grad_norm`, the
   snapshots' norms, and what the non-finite guard decides on (a NaN or Inf gradient skips the step whatever the
   algorithm did to it);
2. every element is clamped to `[-clip_value, clip_value]` (`clip_grad_value`, if set);
3. the algorithm clips (`ClipAlgorithm.clip`), in place;
4. the total norm after clipping (`grad_norm_post_clip`, `clip_coef`, the snapshots' `total_norm_post_clip`) is
   measured after the algorithm ran, unless it returned it.

`max_grad_norm` drives `norm` only (an algorithm reads it from `args` in `from_args` if it wants it). With DDP the
gradients the algorithm sees are already reduced, the same on every process: it must do the same on each (its
state too; the main process saves it). With FSDP2 they are DTensors (`p.grad.mul_` acts on the local shard; use
`grad_norms` for global norms, a collective). Engines that clip inside themselves (DeepSpeed, FSDP1) refuse any
algorithm but `norm`.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 1)
    >>> layer.weight.grad, layer.bias.grad = torch.tensor([[3.0, 4.0]]), torch.tensor([0.0])
    >>> result = clip_with_algorithm(layer.named_parameters(), "norm", max_norm=1.0)
    >>> round(result.total_norm.item(), 4), round(clip_coefficient(result).item(), 4)
    (5.0, 0.2)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..state_fields import StateFieldError
from .agc import AgcClip, agc_clip_, default_agc_exclude, transposed_weights
from .autoclip import AutoClip, AutoClipAlgorithm
from .norm import (
    ClipResult,
    NormClip,
    TotalNormClipAlgorithm,
    check_norm_type,
    clip_gradients,
    grad_norms,
    norms_as_torch_combines,
    total_norm,
)
from .registry import (
    CLIP_ALGORITHMS,
    ClipAlgorithm,
    check_clip_algorithm,
    clip_algorithm_class,
    register_clip_algorithm,
    unregister_clip_algorithm,
)
from .zclip import ZClip, check_zclip_settings

__all__ = [
    "CLIP_ALGORITHMS",
    "AgcClip",
    "AutoClip",
    "AutoClipAlgorithm",
    "ClipAlgorithm",
    "ClipResult",
    "NormClip",
    "TotalNormClipAlgorithm",
    "ZClip",
    "agc_clip_",
    "build_clip_algorithm",
    "check_clip_algorithm",
    "check_norm_type",
    "check_zclip_settings",
    "clip_algorithm_class",
    "clip_by",
    "clip_coefficient",
    "clip_gradients",
    "clip_state_checks",
    "clip_with_algorithm",
    "default_agc_exclude",
    "grad_norms",
    "register_clip_algorithm",
    "total_norm",
    "transposed_weights",
    "unregister_clip_algorithm",
]


def build_clip_algorithm(name: str, args, model: nn.Module | None = None) -> ClipAlgorithm:
    """The registered algorithm `name`, built `from_args(args, model)`."""
    return clip_algorithm_class(name).from_args(args, model)


def clip_by(
    algorithm: ClipAlgorithm,
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    norm_type: float = 2.0,
    clip_value: float | None = None,
) -> ClipResult:
    """Clip the `.grad` of `named_parameters` in place: `clip_value` first, then `algorithm`; no host sync.

    Returns:
        `ClipResult`: per-parameter norms and total norm before any clipping, total norm after clipping (after
        the algorithm ran). Its `param_norms` follow the order of the parameters that have a gradient.
    """
    norm_type = check_norm_type(norm_type)
    named = [(name, param) for name, param in named_parameters if param.grad is not None]
    params = [param for _, param in named]
    result = clip_gradients(params, max_norm=None, norm_type=norm_type, clip_value=clip_value)
    post = algorithm.clip_with_norm(named, norm_type, result.total_norm_post_clip)
    if post is None:
        grads = [p.grad for p in params]
        post = total_norm(norms_as_torch_combines(grad_norms(grads, norm_type), grads), norm_type)
    return ClipResult(param_norms=result.param_norms, total_norm=result.total_norm, total_norm_post_clip=post)


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
    """`clip_by` with a built-in algorithm named by `algorithm` (`"norm"`, `"agc"` or `"autoclip"`), its settings
    given here; another registered name is built with no arguments.

    Args:
        named_parameters: `(name, parameter)` pairs; those without `.grad` are skipped.
        norm_type: norm of the reported norms, and of `norm` clipping.
        clip_value: clamp every element to `[-clip_value, clip_value]` first; `None` skips it.
        max_norm: the bound of `norm` clipping.
        agc_clip_factor, agc_eps, agc_exclude, transposed: as `agc_clip_`'s `clip_factor`, `eps`, `exclude`,
            `transposed`.
        autoclip: the run's `AutoClip` (its history is updated), required for `"autoclip"`.
    """
    check_clip_algorithm(algorithm)
    if algorithm == "norm":
        clipper: ClipAlgorithm = NormClip(max_norm)
    elif algorithm == "agc":
        clipper = AgcClip(agc_clip_factor, agc_eps, agc_exclude, transposed)
    elif algorithm == "autoclip":
        if not isinstance(autoclip, AutoClip):
            raise ValueError(f"`clip_algorithm`='autoclip' needs the run's AutoClip as `autoclip`, got {autoclip!r}.")
        clipper = AutoClipAlgorithm(autoclip=autoclip)
    else:
        clipper = clip_algorithm_class(algorithm)()
    return clip_by(clipper, named_parameters, norm_type=norm_type, clip_value=clip_value)


def clip_coefficient(result: ClipResult) -> torch.Tensor:
    """`total_norm_post_clip / total_norm` (0-d, on the device): 1 where nothing was clipped or the norm is 0, NaN
    where the norm is not finite."""
    pre, post = result.total_norm, result.total_norm_post_clip
    return torch.where(pre == 0, torch.ones_like(pre), post / pre)


def _accept(state: Any) -> Any:
    return state


def clip_state_checks(running: str | None = None, args=None, model: nn.Module | None = None) -> dict[str, Callable]:
    """The check of each entry a checkpoint's state file may hold for a clip algorithm: one per registered class
    that keeps state, under its name.

    A class's own `check_state(state)` where it has one (AutoClip); else, for the run's algorithm (`running`, its
    name), loading the entry into a fresh `from_args(args, model)` instance, whose `load_state_dict` refuses what it
    cannot restore (its error becomes a `StateFieldError` naming the entry); other registered names' entries are
    accepted as they are (they are not loaded).
    """
    checks: dict[str, Callable[[Any], Any]] = {}
    for name in CLIP_ALGORITHMS:
        cls = clip_algorithm_class(name)
        if not cls.keeps_state():
            continue
        own = getattr(cls, "check_state", None)
        if callable(own):
            checks[name] = own
        elif name == running:
            checks[name] = _loading_check(cls, args, model)
        else:
            checks[name] = _accept
    return checks


def _loading_check(cls: type[ClipAlgorithm], args, model) -> Callable[[Any], Any]:
    def check(state: Any) -> Any:
        try:
            cls.from_args(args, model).load_state_dict(state)
        except StateFieldError:
            raise
        except Exception as error:  # noqa: BLE001 - a user's class may raise anything on a bad state
            raise StateFieldError(
                "", f"cannot be restored by {cls.__qualname__}.load_state_dict ({type(error).__name__}: {error})"
            ) from None
        return state

    return check
