"""`SnapshotFeed`: hands each due `GradSnapshotCallback` the norms `GradTrainer` measured, once per optimizer step.

Before clipping it copies the gradient tensors chosen by `grad_snapshot_tensors` and measures the norms of a
callback given its own norm type; after the guards' decision each due callback records the step (with `skipped`,
and the tensors, where there are any).
"""

from __future__ import annotations

from ..clipping import ClipResult, grad_norms, total_norm
from ..components import ClipStep, TrainerComponent
from .tensors import GradTensorSaver


class SnapshotFeed(TrainerComponent):
    """Feeds the trainer's snapshot callbacks (`trainer._snapshot_callbacks()`)."""

    def __init__(self, settings):
        self.settings = settings
        self._saver: GradTensorSaver | None = None
        self._due: list = []
        self._tensors = None
        self._other_norms: dict[int, object] = {}

    @classmethod
    def from_args(cls, settings, model) -> SnapshotFeed:
        return cls(settings)

    def due(self, trainer) -> list:
        """The snapshot callbacks due at this optimizer step."""
        return [cb for cb in trainer._snapshot_callbacks() if cb.is_due(self.settings, trainer.state)]

    def before_clip(self, trainer, step: ClipStep) -> None:
        settings = self.settings
        self._due = self.due(trainer)
        self._tensors = None
        if self._due and settings.grad_snapshot_tensors:
            if self._saver is None:
                self._saver = GradTensorSaver(trainer.model.named_parameters(), settings.grad_snapshot_tensors)
            self._tensors = self._saver.copy(step.step)
        grads = [p.grad for p in step.params]
        self._other_norms = {
            id(cb): grad_norms(grads, cb.norm(settings))
            for cb in self._due
            if cb.norm(settings) != settings.clip_norm_type
        }

    def after_clip(self, trainer, step: ClipStep) -> None:
        if not self._due:
            return
        grads = [p.grad for p in step.params]  # as the algorithm left them (it may have replaced a `.grad`)
        # Only what is there: a `record` overridden with the older signature keeps working.
        extras = {k: v for k, v in (("skipped", bool(step.skipped)), ("tensors", self._tensors)) if v}
        for callback in self._due:
            result = step.result
            if id(callback) in self._other_norms:
                norm_type, norms = callback.norm(self.settings), self._other_norms[id(callback)]
                post = total_norm(grad_norms(grads, norm_type), norm_type)
                result = ClipResult(norms, total_norm(norms, norm_type), post)
            callback.record(self.settings, trainer.state, step.names, result, **extras)
        self._due, self._tensors, self._other_norms = [], None, {}
