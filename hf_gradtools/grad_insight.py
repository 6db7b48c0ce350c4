"""The per-run state of the gradient insight tools that `GradTrainerMixin` calls once per optimizer step.

One `GradInsight` lives for one `train()` call and holds what the clipping, guard and monitoring fields need
between steps: the clipping
algorithm (`clip_algorithm`, any registered `ClipAlgorithm`, with its state), the non-finite guard
(`skip_nonfinite_grads`, `max_nonfinite_skips`), the norms of the last step for the logs (`log_grad_norms`), the
saver of gradient tensors (`grad_snapshot_tensors`) and whether the parameters without gradient have been reported.
The building blocks are in `clipping`, `guards`, `monitoring` and `grad_tensors`; this module only keeps their
state and applies them to a model.

Per step, nothing here waits for the device, except the guard: deciding to skip an optimizer step is a host
decision, so `skip_nonfinite_grads` reads one flag back per step.

Example (an optimizer step whose gradient holds a NaN, skipped):
    >>> import torch
    >>> from hf_gradtools import GradTrainingArguments
    >>> args = GradTrainingArguments("out", max_grad_norm=1.0, skip_nonfinite_grads=True)
    >>> model = torch.nn.Linear(2, 1)
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> model.bias.grad[0] = float("nan")
    >>> params, optimizer = list(model.parameters()), torch.optim.SGD(model.parameters(), lr=0.1)
    >>> insight = GradInsight(GradSettings.from_args(args))
    >>> result = insight.clip(model, params)
    >>> if insight.nonfinite(result):
    ...     insight.skip_step(model, params, result, optimizer, step=1)
    >>> model.weight.grad, insight.guard.nonfinite_skips
    (tensor([[0., 0.]]), 1)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from .clipping import (
    AutoClip,
    AutoClipAlgorithm,
    ClipAlgorithm,
    ClipResult,
    build_clip_algorithm,
    clip_by,
    clip_coefficient,
    clip_state_checks,
)
from .clipping.norm import _is_sharded, _local
from .grad_tensors import GradTensorCopy, GradTensorSaver
from .guards import SHOWN_NAMES, NonFiniteGuard, agree_across_ranks, norms_nonfinite, skip_message
from .monitoring import LayerNormGrouper, no_grad_warning, parameters_without_grad
from .patterns import match_names
from .settings import GradSettings

logger = logging.getLogger(__name__)


def insight_fields_set(settings) -> list[str]:
    """The insight fields of `settings` (a `GradSettings`, or arguments) that are not at their defaults (each needs
    `GradTrainer`'s own clipping)."""
    settings = GradSettings.of(settings)
    flags = (("skip_nonfinite_grads", settings.skip_nonfinite_grads), ("log_grad_norms", settings.log_grad_norms))
    changed = [name for name, on in flags if on]
    if settings.clip_algorithm != "norm":
        changed.insert(0, "clip_algorithm")
    if settings.grad_snapshot_tensors:
        changed.append("grad_snapshot_tensors")
    return changed


def needs_every_step(settings) -> bool:
    """Whether every optimizer step must take `GradTrainer`'s own clipping path (not only snapshot steps)."""
    return bool(set(insight_fields_set(settings)) - {"grad_snapshot_tensors"})


def check_patterns(model: nn.Module, settings) -> None:
    """Fail before training when a pattern of `agc_exclude` or `grad_snapshot_tensors` matches no parameter."""
    settings = GradSettings.of(settings)
    names = [name for name, _ in model.named_parameters()]
    if settings.clip_algorithm == "agc":
        match_names(names, settings.agc_exclude, field="agc_exclude")
    match_names(names, settings.grad_snapshot_tensors, field="grad_snapshot_tensors")


def state_checks(settings, model: nn.Module | None) -> dict:
    """The checks of the clip algorithms' entries in a checkpoint's state file (`clip_state_checks`): the run's
    algorithm's entry is loaded into a fresh instance built from `settings` and `model`."""
    settings = GradSettings.of(settings)
    return clip_state_checks(settings.clip_algorithm, settings, model)


def skip_optimizer_step(optimizer) -> None:
    """Make the next `optimizer.step()` of an accelerate `AcceleratedOptimizer` skip the update and say so.

    The Trainer then leaves the scheduler alone (`accelerator.optimizer_step_was_skipped`), as it does for a step
    that fp16's grad scaler skips. With a grad scaler, the step is handed to it marked as overflowed: it skips the
    update and lowers the scale, as for any overflow. Without one, `step` is a no-op once, then the class's own.
    """
    scaler = getattr(optimizer, "scaler", None)
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(getattr(optimizer, "optimizer", None)), {})
    if scaler is not None and state.get("found_inf_per_device"):
        for found_inf in state["found_inf_per_device"].values():
            found_inf.fill_(1.0)  # the scaler then skips the step and backs off, on every process alike
        return
    previous = optimizer.__dict__.get("step")

    def skipped_step(*args, **kwargs):
        if previous is None:
            del optimizer.step
        else:
            optimizer.step = previous
        optimizer._is_overflow = True
        if scaler is not None:  # keep the scaler's bookkeeping consistent: its scale backs off
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())

    optimizer.step = skipped_step


class GradInsight:
    """Clipping algorithm, non-finite guard, log buffer and gradient-tensor saver of one training run.

    Args:
        settings: the run's `GradSettings` (or its arguments, any `TrainingArguments`, resolved here).
    """

    def __init__(self, settings):
        self.settings = GradSettings.of(settings)
        self.algorithm = self.settings.clip_algorithm
        self._clipper: ClipAlgorithm | None = None  # built at the first step or resume, with the model
        skip = self.settings.skip_nonfinite_grads
        self.guard = NonFiniteGuard(self.settings.max_nonfinite_skips) if skip else None
        self.no_grad_reported = False
        self._names: dict[int, str] = {}
        self._saver: GradTensorSaver | None = None
        self._grouper: LayerNormGrouper | None = None
        self._last: tuple[list[nn.Parameter], ClipResult] | None = None
        self._marked_optimizer = None

    # ---- clipping ----

    def names_of(self, model: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
        """The names of `params` in `model` (a map built once, rebuilt when a parameter is new to it)."""
        if any(id(p) not in self._names for p in params):
            self._names = {id(p): name for name, p in model.named_parameters()}
        return [self._names[id(p)] for p in params]

    def clipper(self, model: nn.Module | None) -> ClipAlgorithm:
        """The run's clip algorithm, built `from_args(settings, model)` on first use (AGC reads the model's head)."""
        if self._clipper is None:
            self._clipper = build_clip_algorithm(self.algorithm, self.settings, model)
        return self._clipper

    @property
    def autoclip(self) -> AutoClip | None:
        """The run's `AutoClip` (its history), when `clip_algorithm` is `autoclip` and it has been built."""
        return self._clipper.autoclip if isinstance(self._clipper, AutoClipAlgorithm) else None

    def clip(self, model: nn.Module, params: list[nn.Parameter]) -> ClipResult:
        """Clip the `.grad` of `params` (those with a gradient) by `clip_value` then the run's algorithm."""
        named = list(zip(self.names_of(model, params), params, strict=True))
        return clip_by(
            self.clipper(model),
            named,
            norm_type=self.settings.clip_norm_type,
            clip_value=self.settings.clip_grad_value,
        )

    # ---- gradient tensors ----

    def copy_tensors(self, model: nn.Module, step: int) -> GradTensorCopy | None:
        """CPU copies of the gradients chosen by `grad_snapshot_tensors` (call before clipping), or `None`."""
        patterns = self.settings.grad_snapshot_tensors
        if not patterns:
            return None
        if self._saver is None:
            self._saver = GradTensorSaver(model.named_parameters(), patterns)
        return self._saver.copy(step)

    # ---- the non-finite guard ----

    def nonfinite(self, result: ClipResult) -> bool:
        """Whether this step's gradients hold NaN or Inf, agreed by every process (one host sync); `False` when
        the guard is off."""
        if self.guard is None:
            return False
        if self._marked_optimizer is not None:  # the last step was skipped; this one is not, unless found so
            self._marked_optimizer._is_overflow = False
            self._marked_optimizer = None
        return bool(agree_across_ranks(norms_nonfinite(result.param_norms)))

    def skip_step(
        self, model: nn.Module, params: list[nn.Parameter], result: ClipResult, optimizer, step: int
    ) -> None:
        """Skip this optimizer step: log the parameters whose gradient held NaN/Inf before clipping (from
        `result.param_norms`: clipping by a NaN norm spreads NaN to every gradient), zero every gradient, make the
        optimizer's step a no-op marked skipped, and count it.

        Raises:
            NonFiniteGradientError: the `max_nonfinite_skips`-th skipped step in a row.
        """
        grads = [p.grad for p in params]
        bad = (~torch.isfinite(result.param_norms)).nonzero().flatten()[:SHOWN_NAMES].tolist()
        all_names = self.names_of(model, params)
        names = [all_names[i] for i in bad]
        logger.warning(skip_message(step, names, self.guard.nonfinite_skips + 1))
        torch._foreach_zero_(_local(grads) if _is_sharded(grads) else grads)
        skip_optimizer_step(optimizer)
        self._marked_optimizer = optimizer
        self.guard.record(True, step, names)

    def step_done(self, params: list[nn.Parameter], result: ClipResult, skipped: bool) -> None:
        """Count a step that was not skipped, and keep its norms for the next log."""
        if self.guard is not None and not skipped:
            self.guard.record(False, 0)
        if self.settings.log_grad_norms:
            self._last = (params, result)

    # ---- logs ----

    def log_entries(self, model: nn.Module) -> dict[str, float]:
        """What the next training log gains: `nonfinite_skips`, and with `log_grad_norms` the per-group norms of
        the last optimizer step, `grad_norm_post_clip` and `clip_coef` (one host sync)."""
        logs: dict[str, float] = {}
        if self.guard is not None:
            logs["nonfinite_skips"] = self.guard.nonfinite_skips
        if self._last is not None:
            params, result = self._last
            self._last = None
            names = self.names_of(model, params)
            if self._grouper is None or self._grouper.names != names:
                self._grouper = LayerNormGrouper(model, names)
            norm_type = self.settings.clip_norm_type
            groups = self._grouper.group_norms(result.param_norms, norm_type)
            coef = clip_coefficient(result)
            values = torch.cat([groups, torch.stack([result.total_norm_post_clip, coef]).float()]).tolist()
            logs.update(zip(self._grouper.keys, values[:-2], strict=True))
            logs["grad_norm_post_clip"], logs["clip_coef"] = values[-2:]
        if self._clipper is not None:
            logs.update(self._clipper.log_entries())
        return logs

    # ---- parameters without gradient ----

    def report_no_grad(self, model: nn.Module) -> list[str] | None:
        """At the run's first optimizer step (before `zero_grad`): the trainable parameters without a gradient,
        named in one warning when there are any; `None` at every later step."""
        if self.no_grad_reported:
            return None
        self.no_grad_reported = True
        names = parameters_without_grad(model)
        if names:
            logger.warning(no_grad_warning(names))
        return names

    # ---- checkpoints ----

    def state_dict(self) -> dict:
        """`{<clip algorithm's name>: ..., "nonfinite_guard": ...}`, each present when it is on and the algorithm
        keeps state (AutoClip: `"autoclip"`); `{}` when neither is."""
        state = {}
        clip_state = self._clipper.state_dict() if self._clipper is not None else None
        if clip_state is not None:
            state[self.algorithm] = clip_state
        if self.guard is not None:
            state["nonfinite_guard"] = self.guard.state_dict()
        return state

    def load_state_dict(
        self, state: dict, checkpoint: str | os.PathLike = "the checkpoint", model: nn.Module | None = None
    ) -> None:
        """Restore what `state_dict()` gave, read back from a checkpoint's state file (checked by `state_checks`);
        warn when a stateful clip algorithm or the guard is on and the checkpoint holds nothing for it."""
        self.clipper(model)
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            logger.warning(
                "%s holds no %s state: it starts afresh in the resumed run.", checkpoint, " or ".join(missing)
            )
        if self.algorithm in state and self._clipper.keeps_state():
            self._clipper.load_state_dict(state[self.algorithm])
        if self.guard is not None and "nonfinite_guard" in state:
            self.guard.load_state_dict(state["nonfinite_guard"])


def check_insight_engine(settings, engine: str | None) -> None:
    """Refuse the insight fields with an engine that clips inside itself (DeepSpeed, FSDP1, XLA)."""
    changed = insight_fields_set(settings)
    if engine and changed:
        fields = ", ".join(f"`{name}`" for name in changed)
        raise ValueError(
            f"{fields} not supported with {engine}, which clips inside its own engine (L2 only). Keep the "
            "default, or use DDP or FSDP2 (`fsdp_config={'version': 2}`)."
        )
