"""`GradTrainerMixin`: freezing, clipping in any norm, exact accumulation and snapshots for any `Trainer` class.

List it first among the bases of a Trainer class; `GradTrainer` and `GradSeq2SeqTrainer` are built that way, and so
is a TRL trainer:

    >>> import trl  # not a dependency of this package, and seconds to import  # doctest: +SKIP
    >>> class GradSFTTrainer(GradTrainerMixin, trl.SFTTrainer):  # doctest: +SKIP
    ...     pass

With every gradient field at its default the trainer behaves as its host class: the same callbacks, files, `args`
object and numbers. The exceptions: gradient accumulation, which here equals one large batch (see `accumulation/`)
where the host's scaling is wrong; each checkpoint also holds `grad_settings.json` (the freeze settings, checked on
resume); and `resume_from_checkpoint=True` takes the last complete checkpoint (`checkpoints.py`), where the host
takes the last one.

The mixin is a thin loop: its overrides call `super()` and hand each point of the training step to the run's
components (`components.py`): the clipping, the guards, the per-layer norms, the noise meter, the unfreezer, the
snapshot feed, and any added with `add_component`.

Example (the last two lines train, on your model and data):
    >>> from hf_gradtools import GradTrainer, GradTrainingArguments
    >>> args = GradTrainingArguments("out", freeze_embeddings=True, freeze_first_n_layers=2,
    ...     gradient_accumulation_steps=4, max_grad_norm=1.0, clip_norm_type=2.0, grad_snapshot_steps=10)
    >>> trainer = GradTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections import deque

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .accumulation import Accumulation, micro_batch_loss_divisors, weighted_loss, window_count
from .accumulation.probe import LossRuleProbe
from .checkpoints import (
    FROZEN_SETTINGS,
    begin_checkpoint_save,
    check_checkpoint_entries,
    check_checkpoint_links,
    check_resume_settings,
    check_state_components,
    checkpoint_save_error,
    checkpoint_step,
    load_training_state,
    resolve_resume_checkpoint,
    run_settings,
    save_run_settings,
    save_training_state,
)
from .clipping import clip_state_checks
from .clipping.component import GradientClipping
from .components import ClipStep, ParameterNames, TrainerComponent, acts_every_step
from .engines import check_engine_support, engine_clips, engine_of_accelerator
from .errors import DamagedCheckpointError, StateFieldError
from .freezing import (
    AutoFreeze,
    CacheFrozenActivations,
    apply_freezing,
    check_activation_cache,
    check_auto_freeze,
    check_something_to_train,
    frozen_by_settings,
    has_frozen_parameters,
    restore_requires_grad,
)
from .guards import (
    SkipNonFinite,
    SkipSpikes,
    StepSkipper,
    device_decision,
    device_skip_blocker,
    has_fresh_state,
    hold_scheduler,
)
from .monitoring import LayerNormsLog, NoiseScaleLog, no_grad_warning, parameters_without_grad
from .patterns import check_patterns
from .schedules import GradualUnfreezeCallback, set_frozen_eval_mode
from .schedules.lr_decay import layerwise_optimizer, refuse_supplied_optimizer
from .schedules.unfreeze_callback import GradualUnfreezing
from .settings import GradSettings
from .signals import exit_cleanly_on_sigterm
from .snapshots import SNAPSHOT_DIR, GradSnapshotCallback
from .snapshots.callback import close_snapshot_callbacks
from .snapshots.feed import SnapshotFeed
from .snapshots.files import discard_snapshots_of_lost_steps

logger = logging.getLogger(__name__)

# The built-in components, in the order their hooks run; each is built `from_args(settings, model)` per run.
BUILTIN_COMPONENTS: tuple[type[TrainerComponent], ...] = (
    GradientClipping,
    SkipNonFinite,
    SkipSpikes,
    AutoFreeze,  # after the guards: a skipped step's norms are left out
    CacheFrozenActivations,  # after automatic freezing: the prefix it serves grows at the step's end
    LayerNormsLog,
    GradualUnfreezing,  # before the noise meter: its window end reduces late-unfrozen gradients under DDP
    NoiseScaleLog,
    SnapshotFeed,
)

__all__ = [
    "BUILTIN_COMPONENTS",
    "GradSeq2SeqTrainer",
    "GradTrainer",
    "GradTrainerMixin",
    "apply_freezing",
    "check_engine_support",
    "frozen_by_settings",
]


class ComponentSteps(TrainerCallback):
    """Hands the end of each optimizer step to the components that act then (attached only for them)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        for component in self.trainer.components:
            component.on_step_end(self.trainer)


def _refusing(component: TrainerComponent):
    """`component.check_state`, any error it raises on a bad entry reported as a damaged field of it."""

    def check(state):
        try:
            return component.check_state(state)
        except StateFieldError:
            raise
        except Exception as error:  # noqa: BLE001 - a user's check may raise anything on a bad state
            raise StateFieldError("", f"was refused by {type(component).__name__}.check_state: {error}") from None

    return check


class GradTrainerMixin:
    """The gradient tools for a `transformers.Trainer` class (list it first among the bases).

    Its training step:

    1. freezes `freeze_embeddings` / `freeze_first_n_layers` before the optimizer is built (the optimizer takes
       only `requires_grad=True` parameters, with the Trainer's weight-decay groups);
    2. makes `gradient_accumulation_steps=N` give the gradient (and the logged loss) of the N micro-batches as one
       batch: a loss that divides by `num_items_in_batch` keeps getting a count and the host's scaling; any other
       is weighted by its normalisation, where that is known for certain: declared with `loss_normalization`, or
       measured on the first window (`accumulation/probe.py`). Otherwise, or when `loss_is_scaled_for_ga` is set
       on the class or the instance, the host's own scaling is kept;
    3. clips once per optimizer step, after the last micro-batch: elements to `clip_grad_value`, then by
       `clip_algorithm` (the total `clip_norm_type` norm to `max_grad_norm` by default); logs the norm before
       clipping as `grad_norm`;
    4. runs the components' hooks around it: guards that skip a step, per-layer norms and the noise scale in the
       logs, gradual unfreezing, the snapshot feed (`GradSnapshotCallback` is attached when there is something to
       record: a frozen parameter, or `grad_snapshot_steps > 0`), and components added with `add_component`;
    5. with `layerwise_lr_decay`, builds the LLRD groups in `create_optimizer`; with `frozen_eval_mode`, keeps
       frozen modules in eval mode in `compute_loss`.

    Same constructor as the host. `args` may be any `TrainingArguments` (subclass or not): it is kept as it is
    (`trainer.args is args`), and its gradient fields are resolved into `self.grad_settings` (a `GradSettings`,
    where a field it lacks reads as its default) when the trainer is built and again when `train()` starts.
    """

    # Decisions kept on the device are read at logs and checkpoints, and at least this often (optimizer steps).
    device_read_every = 100

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(GradTrainerMixin):
            raise TypeError(
                f"{cls.__name__} lists a Trainer class before GradTrainerMixin, so the Trainer's methods hide the "
                f"mixin's and no gradient tool would run. Write `class {cls.__name__}(GradTrainerMixin, <Trainer>)`."
            )

    def __init__(self, model: nn.Module | None = None, args=None, *pargs, **kwargs):
        # Resolved (and validated) once here and again at each `train()`; the components read it, not `args`.
        self.grad_settings = GradSettings.from_args(args)
        check_engine_support(args, self.grad_settings)
        refuse_supplied_optimizer(self.grad_settings, super().__init__, model, args, pargs, kwargs)
        if model is not None and args is not None:  # before anything is written
            self._check_model(model, args)
        self._pending_loss_divisors: deque[torch.Tensor] = deque()
        self._window_rule = None  # the `ItemRule` of the window being accumulated
        self._loss_probe = LossRuleProbe(self)
        self._user_components: list[TrainerComponent] = []
        self._components: list[TrainerComponent] | None = None
        self._names = ParameterNames()
        self._skipper = StepSkipper()
        self._device_skips: list[torch.Tensor] = []  # the flags of steps skipped on the device, not read yet
        self.resumed_checkpoint: str | None = None
        flags = [(p, p.requires_grad) for p in model.parameters()] if model is not None else []
        if model is not None:
            # Before `Trainer.__init__`, which creates `output_dir`: a bad setting must leave nothing behind.
            self._frozen_by_args = apply_freezing(model, self.grad_settings)
        self._applied_freezing = tuple(self.grad_settings.freezing().values())
        try:
            super().__init__(model, args, *pargs, **kwargs)
        except BaseException:
            restore_requires_grad(flags)
            raise
        if args is None:  # the Trainer built its own default arguments
            self.grad_settings = GradSettings.from_args(self.args)
        check_engine_support(self.args, self.grad_settings, self._engine())
        self._attach_snapshot_callback()

    # ---- components ----

    def add_component(self, component: TrainerComponent) -> None:
        """Add a component of your own; it runs after the built-in ones, in every `train()` of this trainer."""
        if not isinstance(component, TrainerComponent):
            raise TypeError(f"`add_component` takes a TrainerComponent, got {type(component).__name__}.")
        self._user_components.append(component)
        if self._components is not None:
            self._components.append(component)

    @property
    def components(self) -> list[TrainerComponent]:
        """The run's components: the built-ins its settings turn on, the unfreezers of your own unfreezing
        callbacks, then yours (built at `train()`, or on first use)."""
        if self._components is None:
            settings, model = self.grad_settings, self.model
            built = [cls.from_args(settings, model) for cls in BUILTIN_COMPONENTS]
            own = [
                GradualUnfreezing(callback=cb)
                for cb in self.callback_handler.callbacks
                if isinstance(cb, GradualUnfreezeCallback) and cb.unfreezer is not None
            ]
            if own and settings.gradual_unfreeze_steps:
                raise ValueError(
                    f"`gradual_unfreeze_steps`={settings.gradual_unfreeze_steps} and a GradualUnfreezeCallback of "
                    "your own with its unfreezer would unfreeze the same blocks twice: use one of them."
                )
            self._components = [c for c in built if c is not None] + own + list(self._user_components)
        return self._components

    def component(self, cls: type) -> TrainerComponent | None:
        """The run's first component of class `cls`, or `None`."""
        return next((c for c in self.components if isinstance(c, cls)), None)

    def _state_checks(self) -> dict:
        """The check of each entry the checkpoint's state file may hold beyond the built-in ones."""
        settings = self.grad_settings
        checks = clip_state_checks(settings.clip_algorithm, settings, self.model)
        checks.update({c.name: _refusing(c) for c in self._user_components if c.name})
        return checks

    # ---- settings, callbacks, model (re)initialisation ----

    def _engine(self) -> str | None:
        return engine_of_accelerator(self.accelerator)

    def _engine_clips(self) -> bool:
        """DeepSpeed, XLA and FSDP1 clip inside their own engines: the Trainer's clipping is used unchanged."""
        return engine_clips(self._engine())

    def _snapshot_callbacks(self) -> list[GradSnapshotCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, GradSnapshotCallback)]

    def _attach_snapshot_callback(self) -> None:
        """Attach a `GradSnapshotCallback` when there is something to record and none is attached yet."""
        if self._snapshot_callbacks():
            return
        if self.grad_settings.grad_snapshot_steps > 0 or has_frozen_parameters(self.model):
            self.add_callback(GradSnapshotCallback())

    def add_callback(self, callback) -> None:
        super().add_callback(callback)
        # Snapshot callbacks get their norms from the snapshot feed instead of measuring with hooks.
        for cb in self._snapshot_callbacks():
            cb.fed_by_trainer = True

    def call_model_init(self, trial=None) -> nn.Module:
        """`Trainer.call_model_init`: the model it builds is checked as one passed in is (at construction, before
        anything is written, and at each `train()`), then frozen as the fields say."""
        model = super().call_model_init(trial)
        if self.args is not None:
            self._check_model(model, self.args)
        if trial is None:
            self._frozen_by_args = apply_freezing(model, self.grad_settings)
        # With a trial, `_hp_search_setup` applies the trial's arguments afterwards, and freezes then.
        return model

    def _hp_search_setup(self, trial) -> None:
        super()._hp_search_setup(trial)
        if trial is not None and self.model_init is not None:
            self.grad_settings = GradSettings.from_args(self.args)  # the trial's arguments
            self._frozen_by_args = apply_freezing(self.model, self.grad_settings)
            self._attach_snapshot_callback()

    def _check_model(self, model: nn.Module, args) -> None:
        """Refuse the gradient fields `model` cannot honour (patterns, automatic freezing, the activation cache)."""
        check_patterns(model, self.grad_settings)
        check_auto_freeze(model, self.grad_settings, args)
        check_activation_cache(model, self.grad_settings)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`, after re-checking the gradient fields (they may have changed since construction).

        `resume_from_checkpoint=True` resumes from the last complete checkpoint (see `_resume_checkpoint`); a
        checkpoint at the end of the run trains nothing more (`_init_training_state`). With gradient snapshots to
        write, SIGTERM exits with status 143 once the queued ones are written (`signals.exit_cleanly_on_sigterm`).
        """
        self.grad_settings = GradSettings.from_args(self.args)
        self._apply_changed_freezing()
        if type(self).create_optimizer is GradTrainerMixin.create_optimizer:  # else the optimizer may hold others
            check_something_to_train(self.model, self.optimizer)  # before anything is deleted or written
        if self.args.max_grad_norm is None:
            raise ValueError("`max_grad_norm` must be a number, got None. Use 0 to turn norm clipping off.")
        self._loss_probe.reset(fresh_model=self.model_init is not None)
        self._attach_snapshot_callback()
        if self.model is not None:
            self._check_model(self.model, self.args)
        if self.grad_settings.grad_snapshot_tensors and not any(
            cb.period(self.grad_settings) > 0 for cb in self._snapshot_callbacks()
        ):
            logger.warning(
                "hf_gradtools: `grad_snapshot_tensors` is set but no gradient snapshot is taken; the tensors are "
                "saved with each snapshot: set `grad_snapshot_steps` too."
            )
        self._components, self._no_grad_reported = None, False  # a fresh set per run
        self._device_skips = []
        # Before anything is read or deleted: a save of the same step or the rotation would go through a link out
        # (or trip on a file in a checkpoint's place), and `True` reads the checkpoints to choose one.
        if self.args.save_strategy != "no" or resume_from_checkpoint is True:
            check_checkpoint_entries(self.args.output_dir)
        resume_from_checkpoint = self._resume_checkpoint(resume_from_checkpoint)
        # SIGTERM exits after the queued snapshots are written (`signals.py`); with none to write (no snapshot
        # period, no record that automatic freezing rewrites), signals stay alone, as with the Trainer.
        writes = self.grad_settings.auto_freeze or any(cb.period(self.args) > 0 for cb in self._snapshot_callbacks())
        on_sigterm = exit_cleanly_on_sigterm() if writes else contextlib.nullcontext()
        with on_sigterm:
            try:
                output = super().train(resume_from_checkpoint, *args, **kwargs)
                self._read_back()
                return output
            finally:
                self._skipper.clear_device_flag()
                self.callback_handler.callbacks = [
                    cb for cb in self.callback_handler.callbacks if not isinstance(cb, ComponentSteps)
                ]
                self._close_snapshot_callbacks()

    def _apply_changed_freezing(self) -> None:
        """Freeze what `args` asks for now, when its freeze fields grew since construction; refuse a shrink."""
        now = tuple(self.grad_settings.freezing().values())
        then = getattr(self, "_applied_freezing", now)
        if now == then or self.model_init is not None:  # `model_init` freezes every fresh model itself
            return
        if any(a < b for a, b in zip(now, then, strict=True)):
            raise ValueError(
                f"`freeze_embeddings`/`freeze_first_n_layers` went from {then} to {now} after the trainer froze the "
                "model: frozen parameters cannot be thawed this way. Build a new trainer (or use "
                "`gradual_unfreeze_steps`)."
            )
        self._frozen_by_args = (self._frozen_by_args or []) + apply_freezing(self.model, self.grad_settings)
        self._applied_freezing = now
        self._attach_snapshot_callback()

    def _close_snapshot_callbacks(self) -> None:
        close_snapshot_callbacks(self._snapshot_callbacks())

    # ---- exact gradient accumulation ----

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        probe = self._loss_probe
        plan: Accumulation | None = probe.rule_for(batch_samples, num_items_in_batch)
        rule = self._window_rule = plan.rule if plan is not None else None
        self._pending_loss_divisors = deque()
        self._count_carries_weights = plan is not None and plan.takes_count
        if rule is None:
            return batch_samples, num_items_in_batch
        if plan.takes_count and rule != probe.trainer_count_rule():
            num_items_in_batch = probe.share_count(window_count(batch_samples, rule), device)
        if not plan.takes_count or self.component(NoiseScaleLog) is not None:  # the meter reads the weights
            divisors = micro_batch_loss_divisors(
                batch_samples,
                rule,
                world_size=self.accelerator.num_processes,
                gather_sum=lambda t: self.accelerator.gather(t.reshape(1)).sum(),
            )
            self._pending_loss_divisors = deque(divisors.unbind())
        # A weighted loss must be the micro-batch's own normalisation: it gets no count; the weights do the rest.
        return batch_samples, num_items_in_batch if plan.takes_count else None

    _count_carries_weights = False

    def _weighted_training_step(self, model, inputs, num_items_in_batch=None):
        if not self._pending_loss_divisors:
            return super().training_step(model, inputs, num_items_in_batch)
        divisor = self._pending_loss_divisors.popleft()
        if self._count_carries_weights:  # the count weights the loss already; the weight was the meter's
            return super().training_step(model, inputs, num_items_in_batch)
        # For this step only (the subclass's own `compute_loss`, whether or not it calls `super()`, weighted): the
        # weighted loss is already scaled for accumulation.
        own = {
            name: self.__dict__[name] for name in ("compute_loss", "loss_is_scaled_for_ga") if name in self.__dict__
        }
        self.compute_loss = weighted_loss(self.compute_loss, divisor)  # a `compute_loss` set on the instance too
        self.loss_is_scaled_for_ga = True
        try:
            return super().training_step(model, inputs, None)
        finally:
            del self.compute_loss, self.loss_is_scaled_for_ga
            self.__dict__.update(own)  # what the user set on the instance, back as it was

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and self.grad_settings.frozen_eval_mode:
            set_frozen_eval_mode(model)  # after the Trainer's `model.train()` of this step
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        components = self.components
        for component in components:
            component.before_micro_batch(self, inputs)
        with contextlib.ExitStack() as contexts:
            for component in components:
                contexts.enter_context(component.micro_batch(self, inputs))
            loss = self._weighted_training_step(model, inputs, num_items_in_batch)
        for component in components:
            component.after_micro_batch(self, inputs, loss)
        if self.accelerator.sync_gradients:  # the window's last backward, before clipping
            for component in components:
                component.on_window_end(self)
        return loss

    # ---- clipping and the components' step hooks, once per optimizer step ----

    def _clip_and_record(self) -> torch.Tensor:
        """Clip the accumulated gradients between the components' hooks; the total norm before clipping."""
        self.accelerator.unscale_gradients()
        self._skipper.begin_step()
        if len(self._device_skips) >= self.device_read_every:  # without logs: the stop and the schedule still come
            self._read_back()
        components = self.components
        params = [p for p in self.model.parameters() if p.grad is not None]
        step = ClipStep(self.state.global_step + 1, params, self._names(self.model, params))
        for component in components:
            component.before_clip(self, step)
        clipping = self.component(GradientClipping) or GradientClipping(self.grad_settings)
        step.result = clipping.clip(self.model, step)
        decisions = [component.should_skip(self, step) for component in components]  # every one is asked
        on_device = [
            device_decision(c, d) for c, d in zip(components, decisions, strict=True) if isinstance(d, torch.Tensor)
        ]
        step.skipped = any(d for d in decisions if not isinstance(d, torch.Tensor))
        if on_device and not step.skipped:  # kept on the device where the optimizer can skip on a flag
            flag = functools.reduce(torch.logical_or, on_device)
            can = device_skip_blocker(self.optimizer, self.lr_scheduler) is None and not has_fresh_state(
                self.optimizer, params
            )
            step.skipped = flag if can else bool(flag)
        for component in components:
            component.after_clip(self, step)
        if step.skipped is True:
            self._skipper.skip(params, self.optimizer)
        elif isinstance(step.skipped, torch.Tensor):
            self._skipper.skip_on_device(self.optimizer, step.skipped)
            self._device_skips.append(step.skipped)
        return step.result.total_norm

    def _read_back(self) -> None:
        """Bring the decisions kept on the device to the host (at logs, checkpoints, the end): the scheduler, which
        stepped past the steps skipped there, is set back by their number; then each component reads its own."""
        if self._device_skips:
            skipped = int(torch.stack(self._device_skips).sum())
            self._device_skips = []
            hold_scheduler(self.lr_scheduler, skipped)
        for component in self._components or ():
            component.read_back(self)

    def _uses_own_clipping(self) -> bool:
        # Only called once gradients exist: the Trainer caches `_has_mixed_mesh_grads` on its first call.
        return not self._engine_clips() and not self._has_mixed_mesh_grads(self.model)

    def _needs_own_clipping(self) -> bool:
        """Whether this step asks for more than the host's L2 clipping (otherwise the host's code runs as is)."""
        settings = self.grad_settings
        if settings.clip_norm_type != 2.0 or settings.clip_grad_value is not None:
            return True
        if any(acts_every_step(component) for component in self.components):
            return True
        return any(cb.is_due(settings, self.state) for cb in self._snapshot_callbacks())

    def _clip_grad_norm(self, model):
        if not self._needs_own_clipping() or not self._uses_own_clipping():
            return super()._clip_grad_norm(model)
        return self._clip_and_record()

    def _get_grad_norm(self, model, grad_norm=None):
        self._report_no_grad()
        if grad_norm is None and self._needs_own_clipping() and self._uses_own_clipping():
            # `max_grad_norm` is 0: no norm clipping, but value clipping, the logged norm and snapshots still run.
            grad_norm = self._clip_and_record()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    _no_grad_reported = False
    _frozen_by_args: list[str] | None = None

    def _report_no_grad(self) -> None:
        """At the run's first optimizer step: warn about trainable parameters without gradient, and list them as
        `no_grad` in the snapshot callbacks' record."""
        if self._no_grad_reported or self._engine_clips():  # an engine that keeps the gradients: `.grad` says nothing
            return
        self._no_grad_reported = True
        names = parameters_without_grad(self.model)
        if names:
            logger.warning(no_grad_warning(names))
        for callback in self._snapshot_callbacks():
            callback.record_no_grad(self.args, self.state, names)

    # ---- optimizer, logs ----

    def create_optimizer(self, model=None):
        """The host's optimizer, with layer-wise rates when `layerwise_lr_decay` is set; then the components'
        `on_train_begin`. `optimizer_cls_and_kwargs` is honoured: its class gets the LLRD groups, its kwargs are
        the defaults."""
        opt_model = self.model if model is None else model
        decay = self.grad_settings.layerwise_lr_decay
        if self.optimizer is None and decay is not None:
            optimizer_cls, kwargs = self.optimizer_cls_and_kwargs or self.get_optimizer_cls_and_kwargs(
                self.args, opt_model
            )
            self.optimizer = layerwise_optimizer(
                opt_model,
                optimizer_cls,
                dict(kwargs),
                base_lr=self.args.learning_rate,
                decay=decay,
                weight_decay=self.args.weight_decay,
                decay_parameter_names=self.get_decay_parameter_names(opt_model),
            )
        optimizer = super().create_optimizer(model)
        self._components = None  # the model is final now: the run's components are built for it
        for component in self.components:
            component.on_train_begin(self)
        steps = [c for c in self.components if type(c).on_step_end is not TrainerComponent.on_step_end]
        if steps and not any(isinstance(cb, ComponentSteps) for cb in self.callback_handler.callbacks):
            self.add_callback(ComponentSteps(self))  # removed when `train()` returns
        return optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._components is not None:  # a training logging step
            self._read_back()
            for component in self._components:
                logs.update(component.log_entries(self))
        return super().log(logs, start_time)

    # ---- resuming and checkpoints ----

    def _resume_checkpoint(self, resume_from_checkpoint) -> str | None:
        """The checkpoint to resume from, checked against this run; the snapshots of later steps are deleted.

        `True` means the last complete checkpoint in `output_dir` (newer, incomplete ones are skipped with a log
        line); a path is taken as given. Freeze settings other than the checkpoint's are refused
        (`ChangedSettingsError`), before anything is loaded or deleted. The snapshots that a lost run wrote after
        the checkpoint's step (in `grad_snapshots/` and in every attached callback's folder) are deleted by the
        main process, so each step the resumed run does again ends up with one snapshot, its own.
        """
        named = resume_from_checkpoint not in (None, False, True)
        self.resumed_checkpoint = None
        if named and not os.path.isdir(resume_from_checkpoint):
            return resume_from_checkpoint  # no checkpoint there: the Trainer says so when loading it
        if named:  # trusted as named; what it holds stays in the run folder it is in (checked before it is read)
            check_checkpoint_links(os.path.dirname(os.path.realpath(resume_from_checkpoint)), resume_from_checkpoint)
        checkpoint = self.resumed_checkpoint = resolve_resume_checkpoint(self.args.output_dir, resume_from_checkpoint)
        if checkpoint is None:
            return None
        if not named:  # found in `output_dir`, it stays inside it
            check_checkpoint_links(self.args.output_dir, checkpoint)
        check_resume_settings(checkpoint, run_settings(self.args))
        # A damaged state file is refused here, before anything is deleted or loaded; so is a resume that would
        # train blocks automatic freezing had frozen.
        state = load_training_state(checkpoint, self._state_checks())
        check_state_components(checkpoint, state, {c.name for c in self.components if c.name})
        try:
            step = checkpoint_step(checkpoint)
        except DamagedCheckpointError:
            raise  # a step out of range: refused on every process, before anything is deleted
        except (OSError, ValueError, KeyError, TypeError):
            return checkpoint  # not a readable checkpoint: the Trainer raises its own error when loading it
        if not self.is_world_process_zero():
            return checkpoint
        folders = {SNAPSHOT_DIR, *(cb.folder for cb in self._snapshot_callbacks())}
        discard_snapshots_of_lost_steps(self.args.output_dir, folders, step)
        return checkpoint

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ) -> tuple[int, int]:
        """`Trainer._init_training_state`; from a checkpoint at `max_steps` or later, the run is finished.

        The Trainer's loop looks at `should_training_stop` only after a step, so from such a checkpoint it trains
        step `max_steps + 1` (and saves it, and its snapshot) wherever the last epoch has batches left. Here the
        position returned is then past the last epoch: the loop trains nothing, and the folder stays as it was.
        """
        position = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is None or self.state.global_step < max_steps:
            return position
        logger.warning(
            "hf_gradtools: %s is at step %d, and this run ends at step %d: it is finished, nothing more is trained "
            "(raise `max_steps` or `num_train_epochs` to train on).",
            resume_from_checkpoint,
            self.state.global_step,
            max_steps,
        )
        return num_train_epochs, 0

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint`, after the queued snapshots are written (a checkpoint at step s counts as
        complete once every snapshot up to s is on disk: the resumed run never writes them again). It marks an
        earlier save of the same folder incomplete first, and records the freeze settings and world size
        (`grad_settings.json`, atomically) before the Trainer's files. A save that runs out of space raises
        `CheckpointSaveError`, naming the file and saying that resuming skips the incomplete folder."""
        self._read_back()  # before the scheduler's position is saved
        for callback in self._snapshot_callbacks():
            callback.flush()
        output_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        check_checkpoint_links(output_dir, folder)  # an earlier save's folder is written into
        try:
            if self.args.should_save:
                begin_checkpoint_save(folder)
                settings = run_settings(self.args)
                if any(settings[name] != GradSettings().freezing()[name] for name in FROZEN_SETTINGS):
                    save_run_settings(folder, settings)  # a default run's checkpoints hold the Trainer's files alone
            super()._save_checkpoint(model, trial)
        except Exception as error:
            no_space = checkpoint_save_error(error, folder)
            if no_space is None:
                raise
            raise no_space from error

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = {}
        for component in self._components or ():
            entry = component.state_dict() if component.name else None
            if entry is not None:
                state[component.name] = entry
        if self.args.should_save and state:
            save_training_state(output_dir, state)

    def _warn_missing_optimizer_files(self, checkpoint: str | None) -> None:
        """One warning for a checkpoint without `optimizer.pt`, `scheduler.pt` or `rng_state*.pth`: the Trainer then
        starts that part afresh without a word, and the resumed run no longer equals an uninterrupted one."""
        if not checkpoint or self.is_deepspeed_enabled or self.is_fsdp_enabled:  # those engines keep their own files
            return
        files = {
            "optimizer": ("optimizer.pt", "optimizer.bin"),
            "scheduler": ("scheduler.pt",),
            "RNG": ("rng_state.pth", f"rng_state_{self.args.process_index}.pth"),  # dropout, sampling
        }
        present = {name for name in os.listdir(checkpoint) if os.path.isfile(os.path.join(checkpoint, name))}
        missing = [what for what, names in files.items() if not present.intersection(names)]
        if missing:
            logger.warning(
                "hf_gradtools: %s holds no %s state (%s missing): the %s %s afresh, so the resumed run will not "
                "equal an uninterrupted one.",
                checkpoint,
                " or ".join(missing),
                ", ".join(files[what][0] for what in missing),
                " and ".join(missing),
                "starts" if len(missing) == 1 else "start",
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        state = load_training_state(checkpoint, self._state_checks()) if checkpoint else {}
        components = [c for c in self.components if c.name] if checkpoint else []
        # The unfreezer first: replaying its events adds the optimizer groups the optimizer's state is loaded into.
        for component in components:
            if isinstance(component, GradualUnfreezing):
                component.load_state_dict(state.get(component.name), self)
        self._warn_missing_optimizer_files(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)
        for component in components:
            if not isinstance(component, GradualUnfreezing):
                component.load_state_dict(state.get(component.name), self)


class GradTrainer(GradTrainerMixin, Trainer):
    """`transformers.Trainer` with the gradient tools of `GradTrainerMixin`."""


class GradSeq2SeqTrainer(GradTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` with the gradient tools of `GradTrainerMixin`."""
