"""`GradTrainerMixin`: freezing, clipping in any norm, exact accumulation and snapshots for any `Trainer` class.

List it first among the bases of a Trainer class; `GradTrainer` and `GradSeq2SeqTrainer` are built that way, and so
is a TRL trainer:

    >>> import trl  # doctest: +SKIP
    >>> class GradSFTTrainer(GradTrainerMixin, trl.SFTTrainer):  # doctest: +SKIP
    ...     pass

With every gradient field at its default the trainer behaves as its host class: the same callbacks, files, `args`
object and numbers. The exceptions: gradient accumulation, which here equals one large batch (see
`accumulation.py` and `loss_probe.py`) where the host's scaling is wrong; each checkpoint also holds
`grad_settings.json` (the freeze settings, checked on resume); and `resume_from_checkpoint=True` takes the last
complete checkpoint (`checkpoints.py`), where the host takes the last one.

Example:
    >>> args = GradTrainingArguments("out", freeze_embeddings=True, freeze_first_n_layers=2,
    ...     gradient_accumulation_steps=4, max_grad_norm=1.0, clip_norm_type=2.0, grad_snapshot_steps=10)
    ... # doctest: +SKIP
    >>> trainer = GradTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import math
import os
import sys
from collections import deque
from collections.abc import Mapping

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .accumulation import (
    DECLARED_RULES,
    SHIFTED_TOKEN,
    TOKEN,
    Accumulation,
    ItemRule,
    batch_rows,
    count_items,
    label_tensor,
    micro_batch_loss_weights,
    window_count,
)
from .checkpoints import (
    FROZEN_SETTINGS,
    begin_checkpoint_save,
    check_resume_settings,
    checkpoint_save_error,
    checkpoint_step,
    resolve_resume_checkpoint,
    run_settings,
    save_run_settings,
)
from .clipping import ClipResult, grad_norms, total_norm
from .errors import DamagedCheckpointError, NoTrainableParametersError
from .freezing import freeze_embeddings, freeze_first_n_layers
from .grad_insight import GradInsight, check_insight_engine, check_patterns, needs_every_step, state_checks
from .layout import find_input_embeddings, find_layer_stack
from .loss_probe import (
    GRADIENT_DIRECTIONS,
    describe_error,
    join_rows,
    probe_count_response,
    probe_loss_normalization,
    project_on_random_signs,
    split_gradient_error,
)
from .noise_scale import WindowNoiseMeter
from .schedules import (
    GradualUnfreezeCallback,
    GradualUnfreezer,
    all_reduce_grads_,
    set_frozen_eval_mode,
    unfreeze_order,
)
from .schedules.lr_decay import layerwise_optimizer
from .settings import GradSettings
from .side_effects import undo_forward_side_effects
from .signals import exit_cleanly_on_sigterm
from .snapshots import SNAPSHOT_DIR, GradSnapshotCallback, discard_grad_snapshots_after
from .training_state import load_training_state, save_training_state

logger = logging.getLogger(__name__)

MAX_PROBE_WINDOWS = 8  # windows whose micro-batches could not measure the loss before giving up


def apply_freezing(model: nn.Module, args) -> list[str]:
    """Freeze what `args` (any `TrainingArguments`, or its `GradSettings`) asks for; return the names frozen.

    All or nothing: on an error (too many layers, no layer stack, nothing left to train) every `requires_grad`
    flag is restored before the error propagates.
    """
    settings = GradSettings.of(args)
    embeddings, layers = settings.freeze_embeddings, settings.freeze_first_n_layers
    if not embeddings and not layers:
        return []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        frozen = freeze_embeddings(model) if embeddings else []
        frozen += freeze_first_n_layers(model, layers)
        if not any(p.requires_grad for p in model.parameters()):
            raise NoTrainableParametersError(
                f"No trainable parameter is left in {type(model).__name__} after freezing (`freeze_embeddings`="
                f"{embeddings}, `freeze_first_n_layers`={layers}). Freeze fewer layers, or unfreeze a head."
            )
    except Exception:
        restore_requires_grad(flags)
        raise
    return frozen


def check_something_to_train(model: nn.Module | None, optimizer=None) -> None:
    """Refuse to train a model none of whose parameters requires a gradient (frozen by hand, or a PEFT model loaded
    for inference): its first backward would fail with torch's "element 0 of tensors does not require grad". An
    optimizer passed in that holds a tensor requiring a gradient (trained beside the model) lets it pass.

    Raises:
        NoTrainableParametersError: naming the model's class (and the class inside a PEFT wrapper).
    """
    if model is None or any(p.requires_grad for p in model.parameters()):
        return
    if optimizer is not None and any(p.requires_grad for group in optimizer.param_groups for p in group["params"]):
        return
    base = _base_model(model)
    name = type(model).__name__ + (f" (around {type(base).__name__})" if base is not model else "")
    count = sum(1 for _ in model.parameters())
    raise NoTrainableParametersError(
        f"No trainable parameter in {name}: all {count} of its parameter tensors have `requires_grad=False` (frozen "
        "by hand, or a PEFT model loaded for inference), so training would fail at the first backward. Unfreeze what "
        "should train (`hf_gradtools.unfreeze`, or `PeftModel.from_pretrained(..., is_trainable=True)`), or pass "
        "in `optimizers` an optimizer holding the tensors to train."
    )


def frozen_by_settings(model: nn.Module, args) -> list[str]:
    """Names of the frozen parameters that `freeze_embeddings` / `freeze_first_n_layers` cover, whoever froze them
    (this trainer, or its caller before building it)."""
    settings = GradSettings.of(args)
    modules = []
    if settings.freeze_embeddings:
        modules += [module for _, module in find_input_embeddings(model)]
    layers = settings.freeze_first_n_layers
    if layers:
        stack = find_layer_stack(model)
        modules += [stack.blocks[i] for i in stack.blocks_of_first(layers)]
    covered = {id(p) for module in modules for p in module.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in covered and not p.requires_grad]


def restore_requires_grad(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for param, flag in flags:
        param.requires_grad_(flag)


def check_engine_support(args, settings: GradSettings | None = None) -> None:
    """Refuse settings an engine that clips inside itself cannot honour, from `args` alone (nothing touched yet).

    `settings`: those of `args`, when resolved already (else resolved here).
    """
    if args is None:
        return
    settings = GradSettings.from_args(args) if settings is None else settings
    custom = settings.clip_norm_type != 2.0 or settings.clip_grad_value is not None or settings.grad_snapshot_steps > 0
    fsdp_version = int((getattr(args, "fsdp_config", None) or {}).get("version", 2))
    engine = "DeepSpeed" if getattr(args, "deepspeed", None) else None
    if getattr(args, "fsdp", None) and fsdp_version == 1:
        engine = "FSDP1"
    if engine and custom:
        raise ValueError(
            f"`clip_norm_type`, `clip_grad_value` and `grad_snapshot_steps` are not supported with {engine}, which "
            "clips inside its own engine (L2 only). Keep their defaults (2.0, None, 0), or use FSDP2 "
            "(`fsdp_config={'version': 2}`) or DDP."
        )
    check_insight_engine(settings, engine)


def _base_model(model: nn.Module) -> nn.Module:
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _has_frozen_parameters(model: nn.Module | None) -> bool:
    return model is not None and any(not p.requires_grad for p in model.parameters())


class GradTrainerMixin:
    """The gradient tools for a `transformers.Trainer` class (list it first among the bases).

    Its training step:

    1. freezes `freeze_embeddings` / `freeze_first_n_layers` before the optimizer is built (the optimizer takes
       only `requires_grad=True` parameters, with the Trainer's weight-decay groups);
    2. makes `gradient_accumulation_steps=N` give the gradient (and the logged loss) of the N micro-batches as one
       batch: a loss that divides by `num_items_in_batch` keeps getting a count and the host's scaling; any other
       is weighted by its normalisation, where that is known for certain: declared with `loss_normalization`, or
       measured on the first window (`loss_probe.py`). Otherwise, or when `loss_is_scaled_for_ga` is set on the
       class or the instance, the host's own scaling is kept;
    3. clips once per optimizer step, after the last micro-batch: elements to `clip_grad_value`, then the total
       `clip_norm_type` norm to `max_grad_norm`; logs the norm before clipping as `grad_norm`;
    4. hands the per-parameter norms to `GradSnapshotCallback`, which is attached when there is something to
       record (a frozen parameter, or `grad_snapshot_steps > 0`).
    5. with the schedule fields: LLRD groups in `create_optimizer`, gradual unfreezing at the end
       of optimizer steps (`GradualUnfreezeCallback`), frozen modules in eval mode in `compute_loss`, and the
       gradient noise scale measured in `training_step`, logged in `log`, checkpointed beside the optimizer.
    6. with the fields of `grad_insight.py`: clips by `clip_algorithm` (norm, AGC, AutoClip), skips
       optimizer steps with non-finite gradients, adds per-layer norms to the logs, saves gradient tensors with
       the snapshots, and warns about trainable parameters that received no gradient at the first step.

    Same constructor as the host. `args` may be any `TrainingArguments` (subclass or not): it is kept as it is
    (`trainer.args is args`), and its gradient fields are resolved into `self.grad_settings` (a `GradSettings`,
    where a field it lacks reads as its default) when the trainer is built and again when `train()` starts.
    """

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
        self._refuse_supplied_optimizer(self.grad_settings, super().__init__, model, args, pargs, kwargs)
        self._setup_grad_insight(model, args)
        self._pending_loss_weights: deque[torch.Tensor] = deque()
        # False: not measured yet in this `train()` call; None: not established, the host's scaling is kept.
        self._probed_rule: Accumulation | None | bool = False
        self._probe_windows = 0
        self._window_rule: ItemRule | None = None  # the rule of the window being accumulated
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
        self._check_engine()
        self._attach_snapshot_callback()

    # ---- settings, callbacks, model (re)initialisation ----

    def _check_engine(self) -> None:
        """Settings may also come from the environment (accelerate config): check the engine actually chosen."""
        if self._engine_clips():
            settings = self.grad_settings
            custom = settings.clip_norm_type != 2.0 or settings.clip_grad_value is not None
            if custom or settings.grad_snapshot_steps:
                raise ValueError(
                    f"`clip_norm_type`, `clip_grad_value` and `grad_snapshot_steps` are not supported with "
                    f"{self.accelerator.distributed_type.value}, which clips inside its own engine. Keep their "
                    "defaults (2.0, None, 0) or train without it."
                )
            check_insight_engine(self.grad_settings, self.accelerator.distributed_type.value)

    def _engine_clips(self) -> bool:
        """DeepSpeed, XLA and FSDP1 clip inside their own engines: the Trainer's clipping is used unchanged."""
        kind = self.accelerator.distributed_type
        if kind == DistributedType.FSDP:
            return getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2
        return kind in (DistributedType.DEEPSPEED, DistributedType.XLA)

    def _snapshot_callbacks(self) -> list[GradSnapshotCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, GradSnapshotCallback)]

    def _attach_snapshot_callback(self) -> None:
        """Attach a `GradSnapshotCallback` when there is something to record and none is attached yet."""
        if self._snapshot_callbacks():
            return
        if self.grad_settings.grad_snapshot_steps > 0 or _has_frozen_parameters(self.model):
            self.add_callback(GradSnapshotCallback())

    def add_callback(self, callback) -> None:
        super().add_callback(callback)
        # Snapshot callbacks get their norms from `_clip_and_record` instead of measuring with hooks.
        for cb in self._snapshot_callbacks():
            cb.fed_by_trainer = True

    def call_model_init(self, trial=None) -> nn.Module:
        model = super().call_model_init(trial)
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
        if self.model_init is not None or self._probed_rule is None:
            # A fresh model (or an earlier run that could not tell) is measured again; the same model keeps its rule.
            self._probed_rule, self._probe_windows = False, 0
        self._attach_snapshot_callback()
        resume_from_checkpoint = self._resume_checkpoint(resume_from_checkpoint)
        self._start_grad_insight()
        # SIGTERM exits after the queued snapshots are written (`signals.py`); with none to write, signals stay alone.
        on_sigterm = exit_cleanly_on_sigterm() if self._snapshot_callbacks() else contextlib.nullcontext()
        with on_sigterm:
            try:
                return super().train(resume_from_checkpoint, *args, **kwargs)
            finally:
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
        """Flush and stop every snapshot writer; an error is raised unless another one is already on its way.

        Every writer is closed even when closing one is interrupted (`TrainingTerminated` from a SIGTERM): the
        interruption is raised after the last one.
        """
        errors, interrupted = [], None
        for callback in self._snapshot_callbacks():
            try:
                callback.close()
            except Exception as error:  # noqa: PERF203
                errors.append(error)
            except BaseException as stop:
                interrupted = interrupted or stop
        if interrupted is not None:
            raise interrupted
        if errors:
            if sys.exc_info()[0] is None:
                raise errors[0]
            for error in errors:
                logger.error("hf_gradtools: a gradient snapshot could not be written: %s", error)

    # ---- exact gradient accumulation ----

    def _loss_rule(self, batch_samples: list, num_items_in_batch=None) -> Accumulation | None:
        """How the loss of these micro-batches is accumulated, or `None` to keep the host's count and scaling."""
        if self.loss_is_scaled_for_ga is not None:
            return None  # the user declared the scaling on the class or the instance
        setting = self.grad_settings.loss_normalization
        if setting == "trainer" or not batch_samples:
            return None
        declared = setting if setting in DECLARED_RULES else None
        if self._probed_rule and self._probed_rule.declared != declared:
            self._probed_rule = False  # `loss_normalization` changed since the last `train()`
        if self._probed_rule is False:
            self._probed_rule = self._measure_loss_rule(batch_samples, num_items_in_batch, declared)
        return self._probed_rule or None

    def _label_key(self) -> str | None:
        """The batch key of the labels when the Trainer's `label_names` name one other than `labels`."""
        names = self.label_names or []
        return names[0] if len(names) == 1 and names[0] != "labels" else None

    def _host_name(self) -> str:
        return type(self).__mro__[type(self).__mro__.index(GradTrainerMixin) + 1].__name__

    def _trainer_count_rule(self) -> ItemRule:
        """The items the Trainer counts for `num_items_in_batch`."""
        return SHIFTED_TOKEN if getattr(self, "_loss_shifts_labels", False) else TOKEN

    def _count_multipliers(self) -> tuple[float, ...]:
        """The factors by which `Trainer.compute_loss` may multiply a loss given a count (its token averaging
        across processes; an override that does not call it does not)."""
        args = self.args
        if args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func):
            return (1.0, float(self.accelerator.num_processes // self.get_tp_size()))
        return (1.0,)

    def _measure_loss_rule(self, batch_samples: list, num_items_in_batch, declared: str | None):
        """Decide how the loss is accumulated (`Accumulation`), from this window; `False`: measure the next one.

        The Trainer's contract comes first. Where the Trainer passes `num_items_in_batch` and the loss divides by
        it, the loss keeps getting a count and the Trainer's scaling: the Trainer's own count, or, where the loss's
        own normalisation is measured (or declared) to count other items, the window's count of those. A loss that
        ignores the count is weighted by its measured (or declared) rule and gets none. A loss that only partly
        divides (a router's auxiliary loss added) takes whichever of the two measured closer to one batch.

        A declared rule is honoured without measuring it; only how the loss answers a count is measured, since
        only a count consistent with the declaration keeps it true for a loss that divides by the count: the
        window's count of the declared items, which makes such a loss the declared mean. A declared `sum` gets no
        count: a sum is what the loss is without one.
        """
        model = self.model
        base = _base_model(model)
        name, host = type(base).__name__, self._host_name()
        rule = dataclasses.replace(DECLARED_RULES[declared], label_key=self._label_key()) if declared else None
        if declared and num_items_in_batch is None:
            return Accumulation(rule, declared=declared)
        config = getattr(base, "config", None)
        batches = [self._probe_inputs(batch, base) for batch in batch_samples]
        ignore = [
            value
            for key, value in (config.to_dict().items() if config is not None else ())
            if key.endswith("ignore_index") and isinstance(value, int) and not isinstance(value, bool)
        ]
        low_precision = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
        rtol = 2e-2 if low_precision else 2e-4
        distributed = self.accelerator.num_processes > 1
        # One micro-batch a window on one process is the batch itself: only the count a loss divides by matters.
        one_batch = self.args.gradient_accumulation_steps == 1 and not distributed
        reduce_max = self._reduce_max if distributed else None
        modes = [(m, m.training) for m in model.modules()]
        metrics = copy.deepcopy(getattr(self, "_metrics", None))  # TRL trainers record metrics in compute_loss
        device = self.args.device
        rng_devices = [device.index or 0] if device.type == "cuda" else []

        def loss_with(batch, count=None) -> float:
            kwargs = {} if count is None else {"num_items_in_batch": count}
            return float(self.compute_loss(model, dict(batch), **kwargs).detach().float().mean())

        response = result = None
        consistent = False
        errors: dict[str, float | None] = {}
        probe_count = num_items_in_batch  # a window without items: any positive count tells as well
        if isinstance(probe_count, torch.Tensor):
            probe_count = probe_count.clamp(min=1)
        elif probe_count is not None:
            probe_count = max(probe_count, 1)
        try:
            model.eval()
            with torch.random.fork_rng(devices=rng_devices), torch.no_grad(), undo_forward_side_effects(model):
                if num_items_in_batch is not None:
                    response = probe_count_response(
                        loss_with,
                        batches,
                        probe_count,
                        rtol=2e-2 if low_precision else 1e-5,
                        reduce_max=reduce_max,
                    )
                kind = response.kind if response is not None else None
                if not declared and kind != "unknown" and (kind == "divides" or not one_batch):
                    result = probe_loss_normalization(
                        loss_with,
                        batches,
                        ignore_indices=ignore,
                        rtol=rtol,
                        reduce_max=reduce_max,
                        allow_join=not distributed,
                        label_key=self._label_key(),
                        own_counts=response.own_counts if response is not None else (),
                        count_multipliers=self._count_multipliers(),
                        join=self._join_rows,
                    )
                    if kind == "mixed" and result.rule is not None and not distributed:
                        # Weighted without a count, one micro-batch must give what the Trainer trains it on.
                        one = batches[0]
                        given = loss_with(one, self._get_num_items_in_batch([one], device))
                        consistent = math.isclose(loss_with(one), given, rel_tol=rtol)
                    if kind in ("divides", "mixed") and not one_batch:
                        errors["count"] = self._gradient_error(batches, None, probe_count)
                    if result.rule is not None and kind != "divides":
                        errors["rule"] = self._gradient_error(batches, result.rule)
        except Exception as error:
            reason = f"computing the loss of part of a micro-batch failed ({type(error).__name__}: {error})"
            return self._keep_host_scaling(name, reason)
        finally:
            for module, training in modes:
                module.training = training
            if metrics is not None:
                self._metrics = metrics

        if declared:
            if response is not None and response.kind == "divides" and rule.kind != "sum":
                logger.info(
                    "hf_gradtools: the loss of %s divides by `num_items_in_batch`; it gets the window's count per %s "
                    "(the declared `loss_normalization`) and %s's own scaling.",
                    name,
                    rule.name,
                    host,
                )
                return Accumulation(rule, takes_count=True, declared=declared)
            return Accumulation(rule, declared=declared)
        if one_batch and kind != "divides":
            return None  # the host's own scaling, exact for one micro-batch
        host_scaling = self._host_scaling(num_items_in_batch, response)
        if response is not None and response.kind == "unknown":
            why = "no micro-batch gave a finite, non-zero loss with `num_items_in_batch`"
            return self._keep_host_scaling(name, why, host_scaling)
        if response is not None and response.kind == "divides":
            unmeasured = "one micro-batch a step is the batch itself" if one_batch else self._unmeasured
            return self._count_passed(name, result.rule, errors.get("count"), unmeasured)
        if response is not None and response.kind == "mixed":
            rule_error, count_error = errors.get("rule"), errors["count"]
            better = rule_error is not None and (count_error is None or rule_error < count_error)
            if not (better and consistent):
                return self._count_passed(name, None, count_error, self._unmeasured, mixed=True)
            logger.info(
                "hf_gradtools: part of the loss of %s does not divide by `num_items_in_batch` (an auxiliary loss?); "
                "it is weighted %s without a count, measured on window %d: accumulation comes %s (with %s's "
                "scaling: %s).",
                name,
                result.reason,
                self._probe_windows + 1,
                describe_error(rule_error),
                host,
                describe_error(count_error),
            )
            return Accumulation(result.rule)

        if not result.conclusive:
            self._probe_windows += 1
            if self._probe_windows < MAX_PROBE_WINDOWS:
                if self._probe_windows == 1:
                    logger.warning(
                        "hf_gradtools: could not establish how the loss of %s is normalised from the first window "
                        "(%s); this window keeps %s's own loss scaling (%s), and the next ones are measured again "
                        "(up to %d windows).",
                        name,
                        result.reason,
                        host,
                        host_scaling,
                        MAX_PROBE_WINDOWS,
                    )
                return False  # the host's scaling for this window; measure again on the next one
        if result.rule is None:
            return self._keep_host_scaling(name, result.reason, host_scaling)
        logger.info(
            "hf_gradtools: the loss of %s is normalised %s, measured on window %d; accumulation weights it %s.",
            name,
            result.reason,
            self._probe_windows + 1,
            describe_error(errors.get("rule"), self._unmeasured),
        )
        return Accumulation(result.rule)

    # The gradient check runs backward passes outside the engine: not where FSDP owns the parameters' gradients.
    _unmeasured = "no micro-batch could be split, FSDP holds the gradients, or a backward pass failed"

    def _gradient_error(self, batches: list, rule: ItemRule | None, count=None) -> float | None:
        """`split_gradient_error` on this model; `None` where it cannot run (FSDP's sharded gradients, no trainable
        parameter, a model that cannot run backward in eval mode): the rule stands, unmeasured."""
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        distributed = self.accelerator.num_processes > 1

        def project(batch, given=None) -> torch.Tensor | None:
            kwargs = {} if given is None else {"num_items_in_batch": given}
            with torch.enable_grad():
                loss = self.compute_loss(model, dict(batch), **kwargs).float().mean()
                if not loss.requires_grad:
                    return None
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            return project_on_random_signs(grads, GRADIENT_DIRECTIONS)

        try:
            error = None
            if params and not self.is_fsdp_enabled:
                error = split_gradient_error(
                    project, batches, rule, count, allow_join=not distributed, join=self._join_rows
                )
        except Exception:  # a check that cannot run leaves the error unmeasured, the rule as it is
            error = None
        if distributed:  # every process decides alike: the largest error, or none measured when one lacks it
            error = self._reduce_max(torch.tensor([math.inf if error is None else error], dtype=torch.float64))
            error = None if math.isinf(error.item()) else error.item()
        return error

    def _keep_host_scaling(self, name: str, reason: str, host_scaling: str | None = None) -> None:
        logger.warning(
            "hf_gradtools: could not establish how the loss of %s is normalised (%s); gradient accumulation keeps "
            "%s's own loss scaling (%s). Declare it with `loss_normalization` (token, shifted_token, sample, element "
            "or sum) to make accumulation exact.",
            name,
            reason,
            self._host_name(),
            host_scaling or self._host_scaling(None, None),
        )
        return None

    def _host_scaling(self, num_items_in_batch, response) -> str:
        """What the host's own scaling does to this loss, in words, for the log line that says it is kept."""
        n = self.args.gradient_accumulation_steps
        if self.loss_is_scaled_for_ga is None and (
            self.compute_loss_func is not None or (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
        ):
            if response is not None and response.kind == "ignores":
                return (
                    f"it passes `num_items_in_batch`, which this loss ignores, and so adds the {n} micro-batch losses "
                    f"without dividing them by {n}: each step's gradient is about {n} times one batch's"
                )
            return "it passes `num_items_in_batch` and adds the micro-batch losses"
        return f"each micro-batch loss divided by {n}: exact only when the micro-batches weigh alike"

    def _join_rows(self, a: dict, b: dict) -> dict | None:
        """Two one-row micro-batches as one batch of two rows, for the row probe: as they are when their shapes
        agree, else padded by the Trainer's data collator as it pads the rows of one batch (`None` when it cannot)."""
        joined = join_rows(a, b)
        if joined is not None or self.data_collator is None or batch_rows(a) != 1 or batch_rows(b) != 1:
            return joined
        if not all(isinstance(v, torch.Tensor) and v.dim() > 0 for batch in (a, b) for v in batch.values()):
            return None
        rows = [{key: value[0].cpu() for key, value in batch.items()} for batch in (a, b)]
        # Dataset rows reach a collator as tensors or as lists, as the dataset's format gives them: try both.
        for features in (rows, [{key: value.tolist() for key, value in row.items()} for row in rows]):
            try:
                joined = self.data_collator(features)
            except Exception:  # a collator that cannot pad these rows (`default_data_collator`) or wants others
                continue
            if isinstance(joined, Mapping) and joined.keys() == a.keys() and batch_rows(joined) == 2:
                return self._prepare_inputs(dict(joined))
        return None

    def _count_passed(
        self, name: str, rule: ItemRule | None, error: float | None, unmeasured: str, mixed: bool = False
    ) -> Accumulation:
        """The loss keeps getting `num_items_in_batch` and the Trainer's scaling; `rule`: the items it counts."""
        host = self._host_name()
        if rule is not None and rule.kind == "sum":
            rule = None  # a loss that is a sum without a count gets the Trainer's count, as the Trainer expects
        counted = self._trainer_count_rule()
        if rule is not None and rule != counted:
            how = (
                f"its own normalisation is per {rule.name} (measured), so it gets the window's count of those "
                f"({host} counts per {counted.name}) and {host}'s scaling"
            )
        else:
            how = f"accumulation keeps {host}'s count and scaling"
        what = "part of the loss does not divide by it (an auxiliary loss?); " if mixed else ""
        logger.info(
            "hf_gradtools: the loss of %s takes `num_items_in_batch`, as %s expects; %s%s: the micro-batches add up "
            "to one batch %s.",
            name,
            host,
            what,
            how,
            describe_error(error, unmeasured),
        )
        return Accumulation(rule, takes_count=True)

    def _probe_inputs(self, batch: dict, base: nn.Module) -> dict:
        """The batch on the device. A seq2seq model that builds its decoder inputs from the labels gets them here,
        built as it builds them, so that the probes' masked labels leave the decoder inputs unchanged."""
        batch = self._prepare_inputs(dict(batch))
        labels = label_tensor(batch, self._label_key())
        config = getattr(base, "config", None)
        if labels is None or "decoder_input_ids" in batch or not getattr(config, "is_encoder_decoder", False):
            return batch
        get_output_embeddings = getattr(base, "get_output_embeddings", None)
        if labels.dim() != 2 or not callable(get_output_embeddings) or get_output_embeddings() is None:
            return batch  # not a generation head (e.g. BART sequence classification decodes its inputs)
        prepare = getattr(base, "prepare_decoder_input_ids_from_labels", None)
        shift = getattr(sys.modules.get(type(base).__module__), "shift_tokens_right", None)
        if callable(prepare):
            batch["decoder_input_ids"] = prepare(labels=labels)
        elif callable(shift):  # Whisper, Speech2Text and others shift the labels with their module's function
            start = getattr(config, "decoder_start_token_id", None)
            batch["decoder_input_ids"] = shift(labels, config.pad_token_id, start)
        return batch

    def _reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.to(self.args.device)
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
        return reduced.to(tensor.device)

    def _share_count(self, count: torch.Tensor, device) -> torch.Tensor:
        """A window's count on this process, summed and shared as the Trainer shares its `num_items_in_batch`."""
        args = self.args
        if args.average_tokens_across_devices and args.world_size > 1:
            count = self.accelerator.gather(count.to(device)).sum()
        elif args.n_gpu > 1:
            count = count // args.n_gpu
        count = count.to(device)
        if args.n_gpu > 1 and count.dim() == 0:
            count = count.unsqueeze(0).expand(args.n_gpu, -1)
        return count / (self.get_tp_size() * self.get_cp_size() * self.get_sp_size())

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        plan = self._loss_rule(batch_samples, num_items_in_batch)
        rule = self._window_rule = plan.rule if plan is not None else None
        self._pending_loss_weights = deque()
        self._count_carries_weights = plan is not None and plan.takes_count
        if rule is None:
            return batch_samples, num_items_in_batch
        if plan.takes_count and rule != self._trainer_count_rule():
            num_items_in_batch = self._share_count(window_count(batch_samples, rule), device)
        if not plan.takes_count or self._noise_meter is not None:  # a count implies the weights the meter reads
            weights = micro_batch_loss_weights(
                batch_samples,
                rule,
                world_size=self.accelerator.num_processes,
                gather_sum=lambda t: self.accelerator.gather(t.reshape(1)).sum(),
            )
            self._pending_loss_weights = deque(weights.unbind())
        # A weighted loss must be the micro-batch's own normalisation: it gets no count; the weights do the rest.
        return batch_samples, num_items_in_batch if plan.takes_count else None

    _count_carries_weights = False

    def _weighted_training_step(self, model, inputs, num_items_in_batch=None):
        if not self._pending_loss_weights:
            return super().training_step(model, inputs, num_items_in_batch)
        weight = self._pending_loss_weights.popleft()
        if self._count_carries_weights:  # the count weights the loss already; the weight was the meter's
            return super().training_step(model, inputs, num_items_in_batch)
        compute_loss = self.compute_loss  # the subclass's own, whether or not it calls `super()`

        def weighted_compute_loss(*args, **kwargs):
            result = compute_loss(*args, **kwargs)
            loss, outputs = result if kwargs.get("return_outputs") else (result, None)
            w = weight.to(loss.device, loss.dtype)
            # A micro-batch with no item (every label ignored) has a NaN mean and weight 0: it adds 0, not NaN.
            loss = torch.where(w > 0, loss * w, torch.zeros_like(loss))
            return (loss, outputs) if kwargs.get("return_outputs") else loss

        # For this step only: the weighted loss is already scaled for accumulation.
        self.compute_loss = weighted_compute_loss
        self.loss_is_scaled_for_ga = True
        try:
            return super().training_step(model, inputs, None)
        finally:
            del self.compute_loss
            del self.loss_is_scaled_for_ga

    # ---- clipping and snapshots, once per optimizer step ----

    def _clip_and_record(self) -> torch.Tensor:
        """Clip the accumulated gradients, feed due snapshots, and return the total norm before clipping."""
        self.accelerator.unscale_gradients()
        insight = self._insight()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        settings = self.grad_settings
        due = [cb for cb in self._snapshot_callbacks() if cb.is_due(settings, self.state)]
        tensors = insight.copy_tensors(self.model, self.state.global_step + 1) if due else None
        norm_type = settings.clip_norm_type
        # A callback given its own norm type measures before clipping, in that norm.
        other_norms = {id(cb): grad_norms(grads, cb.norm(settings)) for cb in due if cb.norm(settings) != norm_type}
        result = insight.clip(self.model, params)  # `clip_grad_value`, then `clip_algorithm`
        grads = [p.grad for p in params]  # as the algorithm left them (it may have replaced a `.grad`)
        skipped = insight.nonfinite(result)
        # Names only on snapshot steps; `named_parameters()` walks the parameters in `parameters()` order.
        names = [n for n, p in self.model.named_parameters() if p.grad is not None] if due else []
        # Only what is there: a `record` overridden with the older signature keeps working.
        extras = {k: v for k, v in (("skipped", skipped), ("tensors", tensors)) if v}
        for callback in due:
            if id(callback) in other_norms:
                cb_norm, norms = callback.norm(settings), other_norms[id(callback)]
                post = total_norm(grad_norms(grads, cb_norm), cb_norm)
                result_in_norm = ClipResult(norms, total_norm(norms, cb_norm), post)
                callback.record(settings, self.state, names, result_in_norm, **extras)
            else:
                callback.record(settings, self.state, names, result, **extras)
        if skipped:
            insight.skip_step(self.model, params, result, self.optimizer, self.state.global_step + 1)
        insight.step_done(params, result, skipped)
        return result.total_norm

    def _uses_own_clipping(self) -> bool:
        # Only called once gradients exist: the Trainer caches `_has_mixed_mesh_grads` on its first call.
        return not self._engine_clips() and not self._has_mixed_mesh_grads(self.model)

    def _needs_own_clipping(self) -> bool:
        """Whether this step asks for more than the host's L2 clipping (otherwise the host's code runs as is)."""
        settings = self.grad_settings
        if settings.clip_norm_type != 2.0 or settings.clip_grad_value is not None:
            return True
        if needs_every_step(settings):
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

    # ---- clipping algorithms, guards, monitoring ----

    def _setup_grad_insight(self, model: nn.Module | None, args) -> None:
        """Before anything is written: patterns of `agc_exclude` / `grad_snapshot_tensors` must match the model."""
        self._grad_insight: GradInsight | None = None
        if model is not None and args is not None:
            check_patterns(model, self.grad_settings)

    def _start_grad_insight(self) -> None:
        """A fresh per-run state at each `train()`; a resumed run restores it from the checkpoint."""
        if self.model is not None:
            check_patterns(self.model, self.grad_settings)
        if self.grad_settings.grad_snapshot_tensors and not any(
            cb.period(self.grad_settings) > 0 for cb in self._snapshot_callbacks()
        ):
            logger.warning(
                "hf_gradtools: `grad_snapshot_tensors` is set but no gradient snapshot is taken; the tensors are "
                "saved with each snapshot: set `grad_snapshot_steps` too."
            )
        self._grad_insight = GradInsight(self.grad_settings)

    def _insight(self) -> GradInsight:
        if self._grad_insight is None:
            self._grad_insight = GradInsight(self.grad_settings)
        return self._grad_insight

    def _report_no_grad(self) -> None:
        """At the first optimizer step: warn about trainable parameters without gradient, list them as `no_grad`."""
        if self._engine_clips():
            return  # the engine keeps the gradients; `.grad` says nothing
        names = self._insight().report_no_grad(self.model)
        if names is not None:
            for callback in self._snapshot_callbacks():
                callback.record_no_grad(self.args, self.state, names)

    def _insight_logs(self) -> dict[str, float]:
        """What a training log gains: `nonfinite_skips` and the norms of `log_grad_norms`."""
        return self._grad_insight.log_entries(self.model) if self._grad_insight is not None else {}

    def _insight_state(self) -> dict:
        """AutoClip's history and the guard's counts, when on, for the checkpoint's `hf_gradtools_state.json`."""
        return self._grad_insight.state_dict() if self._grad_insight is not None else {}

    # ---- resuming and checkpoints ----

    def _resume_checkpoint(self, resume_from_checkpoint) -> str | None:
        """The checkpoint to resume from, checked against this run; the snapshots of later steps are deleted.

        `True` means the last complete checkpoint in `output_dir` (newer, incomplete ones are skipped with a log
        line); a path is taken as given. Freeze settings other than the checkpoint's are refused
        (`ChangedSettingsError`), before anything is loaded or deleted. The snapshots that a lost run wrote after
        the checkpoint's step (in `grad_snapshots/` and in every attached callback's folder) are deleted by the
        main process, so each step the resumed run does again ends up with one snapshot, its own.
        """
        checkpoint = resolve_resume_checkpoint(self.args.output_dir, resume_from_checkpoint)
        if checkpoint is None:
            return None
        check_resume_settings(checkpoint, run_settings(self.args))
        # A damaged state file is refused here, before anything is deleted or loaded.
        load_training_state(checkpoint, state_checks(self.grad_settings, self.model))
        try:
            step = checkpoint_step(checkpoint)
        except DamagedCheckpointError:
            raise  # a step out of range: refused on every process, before anything is deleted
        except (OSError, ValueError, KeyError, TypeError):
            return checkpoint  # not a readable checkpoint: the Trainer raises its own error when loading it
        if not self.is_world_process_zero():
            return checkpoint
        for folder in sorted({SNAPSHOT_DIR, *(cb.folder for cb in self._snapshot_callbacks())}):
            removed = discard_grad_snapshots_after(os.path.join(self.args.output_dir, folder), step)
            if removed:
                logger.info(
                    "hf_gradtools: resuming from step %d; deleted the %d snapshot file(s) of later steps in %s.",
                    step,
                    len(removed),
                    os.path.join(self.args.output_dir, folder),
                )
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
        for callback in self._snapshot_callbacks():
            callback.flush()
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
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

    # ---- schedules, noise scale ----
    # Per `train()` call, from `create_optimizer` (the model is final, no checkpoint loaded yet): the unfreezing
    # plan and position (`gradual_unfreeze_steps`) and the noise-scale meter (`log_grad_noise_scale`).
    _frozen_by_args: list[str] | None = None
    _unfreezer: GradualUnfreezer | None = None
    _noise_meter: WindowNoiseMeter | None = None
    _noise_skip_logged = False

    @staticmethod
    def _refuse_supplied_optimizer(settings: GradSettings, host_init, model, args, pargs, kwargs) -> None:
        """LLRD builds the optimizer's groups itself: an optimizer instance passed in cannot get them."""
        if settings.layerwise_lr_decay is None:
            return
        try:
            optimizers = inspect.signature(host_init).bind_partial(model, args, *pargs, **kwargs).arguments
        except TypeError:
            return  # the host's own error follows
        optimizer = (optimizers.get("optimizers") or (None, None))[0]
        if optimizer is not None:
            raise ValueError(
                f"`layerwise_lr_decay`={settings.layerwise_lr_decay} needs to build the optimizer's "
                f"parameter groups, but an optimizer instance ({type(optimizer).__name__}) was passed in "
                "`optimizers`. Pass its class and kwargs as `optimizer_cls_and_kwargs` instead (honoured, with the "
                "LLRD groups), or leave `layerwise_lr_decay` unset."
            )

    def create_optimizer(self, model=None):
        """The host's optimizer, with layer-wise rates when `layerwise_lr_decay` is set; then the run's schedules.

        `optimizer_cls_and_kwargs` is honoured: its class gets the LLRD groups, its kwargs are the defaults.
        """
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
        self._start_schedules(opt_model)
        return optimizer

    def _start_schedules(self, model: nn.Module) -> None:
        args, settings = self.args, self.grad_settings
        self._noise_skip_logged = False
        self._noise_meter = None
        if settings.log_grad_noise_scale:
            self._noise_meter = WindowNoiseMeter(settings.grad_noise_scale_beta)
        self._unfreezer = None
        every = settings.gradual_unfreeze_steps
        if not every:
            return
        plan = unfreeze_order(model, self._frozen_by_args or frozen_by_settings(model, settings))
        if not plan:
            raise ValueError(
                f"`gradual_unfreeze_steps`={every} but {type(model).__name__} has no block frozen by "
                "`freeze_embeddings` / `freeze_first_n_layers`: there is nothing to unfreeze."
            )
        self._unfreezer = GradualUnfreezer(
            plan,
            every,
            base_lr=args.learning_rate,
            weight_decay=args.weight_decay,
            decay_parameter_names=self.get_decay_parameter_names(model),
            layerwise_lr_decay=settings.layerwise_lr_decay,
        )
        callback = next(
            (cb for cb in self.callback_handler.callbacks if isinstance(cb, GradualUnfreezeCallback)), None
        )
        if callback is None:
            callback = GradualUnfreezeCallback()
            self.add_callback(callback)
        callback.unfreezer = self._unfreezer

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training and self.grad_settings.frozen_eval_mode:
            set_frozen_eval_mode(model)  # after the Trainer's `model.train()` of this step
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        weight, items = self._noise_first_micro_batch(inputs)
        loss = self._weighted_training_step(model, inputs, num_items_in_batch)
        if weight is not None:
            self._noise_meter.first_micro_batch(
                self.model.parameters(), weight, items, self.accelerator.num_processes, self._loss_scale()
            )
        if self.accelerator.sync_gradients:
            self._window_end()
        return loss

    def _noise_first_micro_batch(self, inputs) -> tuple[torch.Tensor | None, object]:
        """The loss weight and item count of a window's first micro-batch, when the noise scale measures it."""
        meter, weights = self._noise_meter, self._pending_loss_weights
        if meter is None or self.current_gradient_accumulation_steps < 2:
            return None, None
        rule = self._window_rule
        if not weights or rule is None or rule.kind == "sum":
            if not self._noise_skip_logged and (
                not weights or len(weights) == self.current_gradient_accumulation_steps
            ):
                self._noise_skip_logged = True
                logger.warning(
                    "hf_gradtools: `grad_noise_scale` skips every window whose loss is not a mean over known items; "
                    "the loss normalisation here is %s. Declare it with `loss_normalization` (token, sample, ...).",
                    "a sum" if rule is not None and rule.kind == "sum" else "not established",
                )
            return None, None
        if len(weights) != self.current_gradient_accumulation_steps:
            return None, None
        return weights[0], count_items(inputs, rule)

    def _loss_scale(self):
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        scale = getattr(scaler, "_scale", None)  # a device tensor: no host sync
        return scale if isinstance(scale, torch.Tensor) else scaler.get_scale()

    def _window_end(self) -> None:
        """After the window's last backward, before clipping: reduce late-unfrozen blocks, measure |G_big|^2."""
        if self._unfreezer is not None and self.accelerator.num_processes > 1:
            # Unfrozen after DDP wrapped the model: DDP does not reduce their gradients.
            all_reduce_grads_(self._unfreezer.unfrozen_parameters(self.model))
        if self._noise_meter is not None:
            self._noise_meter.window_end(self.model.parameters(), self._loss_scale())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training logging step
            if self._unfreezer is not None:
                logs["unfrozen_blocks"] = self._unfreezer.position
            if self._noise_meter is not None:
                value, windows = torch.stack(
                    [self._noise_meter.estimate.value, self._noise_meter.estimate.num_updates]
                )
                value, windows = value.item(), windows.item()
                if windows > 0:
                    logs["grad_noise_scale"] = value
            logs.update(self._insight_logs())
        return super().log(logs, start_time)

    def _schedule_state(self) -> dict:
        state = {}
        if self._unfreezer is not None:
            state["unfreezer"] = self._unfreezer.state_dict()
        if self._noise_meter is not None:
            state["noise_scale"] = self._noise_meter.estimate.state_dict()
        return state

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = {**self._schedule_state(), **self._insight_state()}
        if self.args.should_save and state:
            save_training_state(output_dir, state)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        state = load_training_state(checkpoint, state_checks(self.args, self.model)) if checkpoint else {}
        if checkpoint is not None and (self._unfreezer is not None or self._noise_meter is not None):
            self._restore_schedules(checkpoint, state)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self._grad_insight is not None:
            self._grad_insight.load_state_dict(state, checkpoint, self.model)

    def _restore_schedules(self, checkpoint: str, state: dict) -> None:
        """Replay the checkpoint's unfreezing events (so the optimizer state loads into the right groups) and
        restore the noise-scale averages."""
        if self._unfreezer is not None:
            if "unfreezer" not in state:
                raise ValueError(
                    f"`gradual_unfreeze_steps`={self._unfreezer.every_n_steps} but the checkpoint {checkpoint} holds "
                    "no unfreezing position (it was trained without gradual unfreezing). Resume with the settings "
                    "it was trained with."
                )
            self._unfreezer.load_state_dict(state["unfreezer"])
            self._unfreezer.replay(self.model, self.optimizer, self.lr_scheduler)
        if self._noise_meter is not None:
            if "noise_scale" in state:
                self._noise_meter.estimate.load_state_dict(state["noise_scale"])
            else:
                logger.info("hf_gradtools: %s holds no noise-scale averages; they start afresh.", checkpoint)


class GradTrainer(GradTrainerMixin, Trainer):
    """`transformers.Trainer` with the gradient tools of `GradTrainerMixin`."""


class GradSeq2SeqTrainer(GradTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` with the gradient tools of `GradTrainerMixin`."""
