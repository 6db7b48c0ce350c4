"""`GradientClipping`: the run's clipping as a trainer component (`clip_grad_value`, then `clip_algorithm`).

The trainer calls `clip` once per optimizer step; the algorithm's state is kept in the checkpoint under the
algorithm's name, and its `log_entries` reach the training logs.

Example:
    >>> import torch
    >>> from hf_gradtools.components import ClipStep
    >>> from hf_gradtools.settings import GradSettings
    >>> from transformers import TrainingArguments
    >>> layer = torch.nn.Linear(2, 1)
    >>> layer.weight.grad, layer.bias.grad = torch.tensor([[3.0, 4.0]]), torch.tensor([0.0])
    >>> settings = GradSettings.from_args(TrainingArguments("out", max_grad_norm=1.0, report_to="none"))
    >>> clipping = GradientClipping.from_args(settings, layer)
    >>> step = ClipStep(1, list(layer.parameters()), ["weight", "bias"])
    >>> round(clipping.clip(layer, step).total_norm_post_clip.item(), 4)
    1.0
"""

from __future__ import annotations

from torch import nn

from ..components import ClipStep, TrainerComponent, warn_starts_afresh
from . import ClipAlgorithm, ClipResult, build_clip_algorithm, clip_by


class GradientClipping(TrainerComponent):
    """`clip_grad_value`, then the registered `clip_algorithm`, built on first use with the model."""

    def __init__(self, settings):
        self.settings = settings
        self.name = settings.clip_algorithm
        self.every_step = settings.clip_algorithm != "norm"
        self._algorithm: ClipAlgorithm | None = None

    @classmethod
    def from_args(cls, settings, model: nn.Module | None) -> GradientClipping:
        return cls(settings)

    def algorithm(self, model: nn.Module | None) -> ClipAlgorithm:
        """The run's clip algorithm, built `from_args(settings, model)` on first use (AGC reads the model's head)."""
        if self._algorithm is None:
            self._algorithm = build_clip_algorithm(self.name, self.settings, model)
        return self._algorithm

    def clip(self, model: nn.Module, step: ClipStep) -> ClipResult:
        """Clip the gradients of `step.params` in place; the norms before and after."""
        return clip_by(
            self.algorithm(model),
            list(zip(step.names, step.params, strict=True)),
            norm_type=self.settings.clip_norm_type,
            clip_value=self.settings.clip_grad_value,
        )

    def log_entries(self, trainer) -> dict[str, float]:
        return self._algorithm.log_entries() if self._algorithm is not None else {}

    def state_dict(self):
        return self._algorithm.state_dict() if self._algorithm is not None else None

    def load_state_dict(self, state, trainer) -> None:
        algorithm = self.algorithm(trainer.model)
        if state is None:
            if algorithm.keeps_state():
                warn_starts_afresh(trainer, self.name)
            return
        if algorithm.keeps_state():
            algorithm.load_state_dict(state)
