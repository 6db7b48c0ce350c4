"""`ClipAlgorithm`, the interface of a clip algorithm, and the registry of the names `clip_algorithm` accepts.

A registered algorithm is found by its name: `GradTrainingArguments(clip_algorithm=name)`, or
`--clip_algorithm name` on the command line, once the class is registered (the choices are read when the value is
checked, not when the arguments class is defined). The built-in `norm`, `agc` and `autoclip` are registered the
same way, in that order, when `hf_gradtools.clipping` is imported.

Example:
    >>> import torch
    >>> @register_clip_algorithm("halve_example")
    ... class Halve(ClipAlgorithm):
    ...     def clip(self, named_parameters, norm_type):
    ...         for _, p in named_parameters:
    ...             p.grad.mul_(0.5)
    >>> "halve_example" in CLIP_ALGORITHMS, check_clip_algorithm("halve_example")
    (True, 'halve_example')
    >>> unregister_clip_algorithm("halve_example")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


class ClipAlgorithm:
    """One way to clip the accumulated gradients once per optimizer step; subclass it and register it.

    `GradTrainer` builds one instance per `train()` call (`from_args`), and at each optimizer step, after value
    clipping (`clip_grad_value`) and after measuring the norms it logs, calls `clip` with the parameters that have
    a gradient. Override `state_dict` / `load_state_dict` to keep state across a resume, and `log_entries` to add
    to the training logs.
    """

    name: str = ""  # set by `register_clip_algorithm`

    @classmethod
    def from_args(cls, args, model: nn.Module | None = None) -> ClipAlgorithm:
        """The algorithm for a run. Default: `cls()`, no arguments.

        Args:
            args: the run's settings (`hf_gradtools.settings.GradSettings`): every gradient-tool field, at its
                default where the run's arguments lack it; any other attribute (`max_grad_norm`, a field of your
                own subclass of `GradTrainingArguments`) reads through to the run's arguments.
            model: the model being trained (its parameter names, its structure), or `None` outside a trainer.
        """
        return cls()

    def clip(self, named_parameters: list[tuple[str, nn.Parameter]], norm_type: float) -> torch.Tensor | None:
        """Clip the `.grad` of `named_parameters` in place (each has a gradient).

        Args:
            named_parameters: `(name, parameter)` pairs, names as in `model.named_parameters()`.
            norm_type: the run's `clip_norm_type`, for an algorithm that measures norms.

        Returns:
            `None`, or, where the algorithm has it at hand, the `norm_type` norm of all the gradients after
            clipping (a 0-d tensor, on the device); when `None` it is measured after `clip` returns.
        """
        raise NotImplementedError(f"{type(self).__name__} must define clip(named_parameters, norm_type).")

    def clip_with_norm(
        self, named_parameters: list[tuple[str, nn.Parameter]], norm_type: float, norm: torch.Tensor
    ) -> torch.Tensor | None:
        """`clip`, given the `norm_type` norm of the gradients as they reach it (measured anyway, after value
        clipping). Default: `clip`; an algorithm that needs that norm overrides this to avoid measuring again
        (`TotalNormClipAlgorithm` does, and measures it in `clip` when called on its own)."""
        return self.clip(named_parameters, norm_type)

    def state_dict(self) -> Any:
        """What a checkpoint keeps, plain JSON values (a dict), or `None` (the default): nothing to keep."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Restore what `state_dict` returned, read back from a checkpoint as untrusted input: raise (e.g.
        `ValueError`) on what cannot be restored; `GradTrainer` reports it as a damaged checkpoint."""

    def log_entries(self) -> dict[str, float]:
        """What each training log gains (plain numbers; a host sync here is yours). Default: nothing."""
        return {}

    @classmethod
    def keeps_state(cls) -> bool:
        """Whether the class overrides `state_dict` (so a checkpoint may hold an entry under its name)."""
        return cls.state_dict is not ClipAlgorithm.state_dict


_REGISTRY: dict[str, type[ClipAlgorithm]] = {}
# The other entries of a checkpoint's state file (`checkpoints.COMPONENT_CHECKS`): a clip algorithm's state is
# kept under its name, so these names are not for a clip algorithm.
RESERVED_NAMES = ("unfreezer", "noise_scale", "nonfinite_guard", "spike_guard", "auto_freeze")


def register_clip_algorithm(name: str, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: make a `ClipAlgorithm` subclass the value `clip_algorithm=name` selects.

    Args:
        name: a non-empty string, not yet registered, and not one of `RESERVED_NAMES` (the checkpoint's state file
            keeps an algorithm's state under its name, beside the other components').
        replace: register `name` again, replacing the class (e.g. re-running a notebook cell).
    """
    if not isinstance(name, str) or not name or name.strip() != name:
        raise ValueError(f"A clip algorithm's name must be a non-empty string without spaces around, got {name!r}.")
    if name in RESERVED_NAMES:
        raise ValueError(
            f"{name!r} cannot name a clip algorithm: the checkpoint's state file uses it for another component "
            f"({', '.join(RESERVED_NAMES)} are taken)."
        )

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, ClipAlgorithm)):
            raise TypeError(f"`register_clip_algorithm({name!r})` takes a ClipAlgorithm subclass, got {cls!r}.")
        if name in _REGISTRY and _REGISTRY[name] is not cls and not replace:
            raise ValueError(
                f"A clip algorithm named {name!r} is already registered ({_REGISTRY[name].__qualname__}); choose "
                "another name, or pass `replace=True`."
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def unregister_clip_algorithm(name: str) -> None:
    """Remove `name` from the registry (a `KeyError` if it is not registered)."""
    del _REGISTRY[name]


def clip_algorithm_class(name: str) -> type[ClipAlgorithm]:
    """The class registered as `name`; a `ValueError` naming `clip_algorithm` and the registered names if none."""
    return _REGISTRY[check_clip_algorithm(name)]


class _RegisteredNames(Sequence):
    """The registered names, in registration order, read at each use: `choices` of the `clip_algorithm` field."""

    def __getitem__(self, index):
        return list(_REGISTRY)[index]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __contains__(self, value) -> bool:
        return isinstance(value, str) and value in _REGISTRY

    def __repr__(self) -> str:
        return repr(list(_REGISTRY))


CLIP_ALGORITHMS: Sequence[str] = _RegisteredNames()


def check_clip_algorithm(value: str) -> str:
    """Return `value` if it is a registered name, else raise a `ValueError` naming `clip_algorithm` and them."""
    if value not in CLIP_ALGORITHMS:
        allowed = ", ".join(repr(a) for a in CLIP_ALGORITHMS)
        raise ValueError(
            f"`clip_algorithm` must be one of {allowed}, got {value!r}. Another algorithm can be added with "
            "`hf_gradtools.register_clip_algorithm`."
        )
    return value
