"""`GradTrainer`: the `transformers.Trainer` with freezing, clipping in any norm, exact accumulation and snapshots.

Example:
    >>> args = GradTrainingArguments("out", freeze_embeddings=True, freeze_first_n_layers=2,
    ...     gradient_accumulation_steps=4, max_grad_norm=1.0, clip_norm_type=2.0, grad_snapshot_steps=10)
    ... # doctest: +SKIP
    >>> trainer = GradTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

from collections import deque

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainingArguments

from .accumulation import loss_shifts_labels, micro_batch_loss_weights
from .clipping import ClipResult, clip_gradients, grad_norms, total_norm
from .errors import NoTrainableParametersError
from .freezing import freeze_embeddings, freeze_first_n_layers
from .snapshots import GradSnapshotCallback
from .training_args import GradTrainingArguments


def apply_freezing(model: nn.Module, args: GradTrainingArguments) -> list[str]:
    """Freeze what `args` asks for; return the names frozen.

    All or nothing: on an error (too many layers, no layer stack, nothing left to train) every `requires_grad`
    flag is restored before the error propagates.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        frozen = []
        if args.freeze_embeddings:
            frozen += freeze_embeddings(model)
        frozen += freeze_first_n_layers(model, args.freeze_first_n_layers)
        if not any(p.requires_grad for p in model.parameters()):
            raise NoTrainableParametersError(
                f"No trainable parameter is left in {type(model).__name__} after freezing (`freeze_embeddings`="
                f"{args.freeze_embeddings}, `freeze_first_n_layers`={args.freeze_first_n_layers}). "
                "Freeze fewer layers, or unfreeze a head."
            )
    except Exception:
        for param, flag in flags:
            param.requires_grad_(flag)
        raise
    return frozen


class GradTrainer(Trainer):
    """A drop-in `Trainer` whose training step:

    1. freezes `freeze_embeddings` / `freeze_first_n_layers` before the optimizer is built (the optimizer takes
       only `requires_grad=True` parameters, with the Trainer's weight-decay groups);
    2. weights each micro-batch loss so that `gradient_accumulation_steps=N` gives exactly the gradient (and the
       logged loss) of the mean over every item of the N micro-batches, also for a shorter last window and
       micro-batches of unequal size (see `accumulation.py`);
    3. clips once per optimizer step, after the last micro-batch: elements to `clip_grad_value`, then the total
       `clip_norm_type` norm to `max_grad_norm`; logs the norm before clipping as `grad_norm`;
    4. hands the per-parameter norms to `GradSnapshotCallback` every `grad_snapshot_steps` steps.

    Same constructor as `Trainer`; a plain `TrainingArguments` is converted (added fields at their defaults).
    A `compute_loss_func`, or a subclass that sets `loss_is_scaled_for_ga`, keeps the Trainer's own loss scaling.
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *pargs, **kwargs):
        if args is None:
            args = GradTrainingArguments(output_dir="tmp_trainer")
        args = GradTrainingArguments.from_training_arguments(args)
        self._pending_loss_weights: deque[torch.Tensor] = deque()
        self._loss_weight: torch.Tensor | None = None
        if model is not None:
            # Before `Trainer.__init__`, which creates `output_dir`: a bad setting must leave nothing behind.
            apply_freezing(model, args)
        super().__init__(model, args, *pargs, **kwargs)
        self._check_supported()
        if not any(isinstance(cb, GradSnapshotCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(GradSnapshotCallback())
        self._feed_snapshot_callbacks()

    def _engine_clips(self) -> bool:
        """DeepSpeed, FSDP and XLA clip inside their own engines: the Trainer's clipping is used unchanged."""
        return self.accelerator.distributed_type in (
            DistributedType.DEEPSPEED,
            DistributedType.XLA,
            DistributedType.FSDP,
        )

    def _check_supported(self) -> None:
        custom = self.args.clip_norm_type != 2.0 or self.args.clip_grad_value is not None
        if self._engine_clips() and (custom or self.args.grad_snapshot_steps):
            raise ValueError(
                f"`clip_norm_type`, `clip_grad_value` and `grad_snapshot_steps` are not supported with "
                f"{self.accelerator.distributed_type.value}, which clips inside its own engine. Keep their defaults "
                "(2.0, None, 0) or train without it."
            )

    def add_callback(self, callback) -> None:
        super().add_callback(callback)
        self._feed_snapshot_callbacks()

    def _feed_snapshot_callbacks(self) -> None:
        """Snapshot callbacks get their norms from `_clip_and_record` instead of measuring with hooks."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, GradSnapshotCallback):
                callback.fed_by_trainer = True

    def call_model_init(self, trial=None) -> nn.Module:
        model = super().call_model_init(trial)
        apply_freezing(model, self.args)
        return model

    # ---- exact gradient accumulation ----

    def _weights_losses(self) -> bool:
        return self.compute_loss_func is None and type(self).loss_is_scaled_for_ga is None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._weights_losses():
            world_size = self.accelerator.num_processes
            weights = micro_batch_loss_weights(
                batch_samples,
                shifts_labels=self._loss_shifts_labels or loss_shifts_labels(self.model),
                world_size=world_size,
                gather_sum=lambda t: self.accelerator.gather(t.reshape(1)).sum(),
            )
            self._pending_loss_weights = deque(weights.unbind())
            # The model must return its plain mean; the weights do the normalisation.
            num_items_in_batch = None
        return batch_samples, num_items_in_batch

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._loss_weight = self._pending_loss_weights.popleft() if self._pending_loss_weights else None
        if self._weights_losses():
            # True: the weighted loss is already scaled; None: the Trainer divides by the accumulation steps.
            self.loss_is_scaled_for_ga = True if self._loss_weight is not None else None
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._loss_weight = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        weight = self._loss_weight
        if weight is None:
            return result
        loss, outputs = result if return_outputs else (result, None)
        weight = weight.to(loss.device, loss.dtype)
        # A micro-batch with no item (every label -100) has a NaN mean and weight 0: it adds 0, not NaN.
        loss = torch.where(weight > 0, loss * weight, torch.zeros_like(loss))
        return (loss, outputs) if return_outputs else loss

    # ---- clipping and snapshots, once per optimizer step ----

    def _clip_and_record(self) -> torch.Tensor:
        """Clip the accumulated gradients, feed due snapshots, and return the total norm before clipping."""
        self.accelerator.unscale_gradients()
        args = self.args
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        due = [
            cb
            for cb in self.callback_handler.callbacks
            if isinstance(cb, GradSnapshotCallback) and cb.is_due(args, self.state)
        ]
        # A callback given its own norm type measures before clipping, in that norm.
        other_norms = {id(cb): grad_norms(grads, cb.norm(args)) for cb in due if cb.norm(args) != args.clip_norm_type}
        result = clip_gradients(
            params, max_norm=args.max_grad_norm, norm_type=args.clip_norm_type, clip_value=args.clip_grad_value
        )
        # Names only on snapshot steps; `named_parameters()` walks the parameters in `parameters()` order.
        names = [n for n, p in self.model.named_parameters() if p.grad is not None] if due else []
        for callback in due:
            if id(callback) in other_norms:
                norm_type, norms = callback.norm(args), other_norms[id(callback)]
                post = total_norm(grad_norms(grads, norm_type), norm_type)
                callback.record(args, self.state, names, ClipResult(norms, total_norm(norms, norm_type), post))
            else:
                callback.record(args, self.state, names, result)
        return result.total_norm

    def _uses_own_clipping(self) -> bool:
        # Only called once gradients exist: the Trainer caches `_has_mixed_mesh_grads` on its first call.
        return not self._engine_clips() and not self._has_mixed_mesh_grads(self.model)

    def _clip_grad_norm(self, model):
        if not self._uses_own_clipping():
            return super()._clip_grad_norm(model)
        return self._clip_and_record()

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self._uses_own_clipping():
            # `max_grad_norm` is 0: no norm clipping, but value clipping, the logged norm and snapshots still run.
            grad_norm = self._clip_and_record()
        return super()._get_grad_norm(model, grad_norm=grad_norm)
