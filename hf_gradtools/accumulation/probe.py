"""`LossRuleProbe`: decides, on a trainer's first window, how its loss is accumulated exactly.

The probes themselves (`loss_probe.py`) measure a loss function; this adapter runs them on a trainer: its
`compute_loss` (the subclass's own), its device placement, its data collator (to join one-row micro-batches), its
count of items (`num_items_in_batch`) and scaling, across processes. The decision (`Accumulation`) holds for the
run; where no decision can be made, the host's own scaling is kept and one warning says what it does.
`GradTrainerMixin.get_batch_samples` asks it, once per window: `LossRuleProbe(trainer).rule_for(batch_samples,
num_items_in_batch)`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
from collections.abc import Mapping

import torch
from torch import nn

from ..side_effects import undo_forward_side_effects
from .loss_probe import (
    GRADIENT_DIRECTIONS,
    describe_error,
    join_rows,
    probe_count_response,
    probe_loss_normalization,
    project_on_random_signs,
    split_gradient_error,
)
from .weights import DECLARED_RULES, SHIFTED_TOKEN, TOKEN, Accumulation, ItemRule, batch_rows, label_tensor

logger = logging.getLogger(__name__)

MAX_PROBE_WINDOWS = 8  # windows whose micro-batches could not measure the loss before giving up


def base_model(model: nn.Module) -> nn.Module:
    """The model inside a PEFT wrapper, or `model`."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


class LossRuleProbe:
    """The accumulation rule of one trainer's loss, measured once per `train()` (see the module docstring).

    Args:
        trainer: a `GradTrainerMixin` trainer.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        # False: not measured yet in this `train()` call; None: not established, the host's scaling is kept.
        self._probed_rule: Accumulation | None | bool = False
        self._probe_windows = 0

    def reset(self, fresh_model: bool) -> None:
        """At `train()`: a fresh model (or an earlier run that could not tell) is measured again."""
        if fresh_model or self._probed_rule is None:
            self._probed_rule, self._probe_windows = False, 0

    def rule_for(self, batch_samples: list, num_items_in_batch=None) -> Accumulation | None:
        """How the loss of these micro-batches is accumulated, or `None` to keep the host's count and scaling."""
        if self.trainer.loss_is_scaled_for_ga is not None:
            return None  # the user declared the scaling on the class or the instance
        setting = self.trainer.grad_settings.loss_normalization
        if setting == "trainer" or not batch_samples:
            return None
        declared = setting if setting in DECLARED_RULES else None
        if declared == "shifted_token":
            labels = label_tensor(batch_samples[0], self._label_key())
            if labels is not None and labels.dim() < 2:
                raise ValueError(
                    "`loss_normalization`='shifted_token' declares a causal LM's per-token mean after the one-token "
                    f"shift, but the labels are one per row (shape {tuple(labels.shape)}): the shift would drop a "
                    "row. Declare 'sample' (one label a row), or leave it 'auto'."
                )
        if self._probed_rule and self._probed_rule.declared != declared:
            self._probed_rule = False  # `loss_normalization` changed since the last `train()`
        if self._probed_rule is False:
            self._probed_rule = self._measure_loss_rule(batch_samples, num_items_in_batch, declared)
        return self._probed_rule or None

    def _label_key(self) -> str | None:
        """The batch key of the labels when the Trainer's `label_names` name one other than `labels`."""
        names = self.trainer.label_names or []
        return names[0] if len(names) == 1 and names[0] != "labels" else None

    def _host_name(self) -> str:
        mro = type(self.trainer).__mro__
        mixin = next(i for i, cls in enumerate(mro) if cls.__name__ == "GradTrainerMixin")
        return mro[mixin + 1].__name__

    def trainer_count_rule(self) -> ItemRule:
        """The items the Trainer counts for `num_items_in_batch`."""
        return SHIFTED_TOKEN if getattr(self.trainer, "_loss_shifts_labels", False) else TOKEN

    def _count_multipliers(self) -> tuple[float, ...]:
        """The factors by which `Trainer.compute_loss` may multiply a loss given a count (its token averaging
        across processes; an override that does not call it does not)."""
        args = self.trainer.args
        if args.average_tokens_across_devices and (
            self.trainer.model_accepts_loss_kwargs or self.trainer.compute_loss_func
        ):
            return (1.0, float(self.trainer.accelerator.num_processes // self.trainer.get_tp_size()))
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
        model = self.trainer.model
        base = base_model(model)
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
        distributed = self.trainer.accelerator.num_processes > 1
        # One micro-batch a window on one process is the batch itself: only the count a loss divides by matters.
        one_batch = self.trainer.args.gradient_accumulation_steps == 1 and not distributed
        reduce_max = self._reduce_max if distributed else None
        modes = [(m, m.training) for m in model.modules()]
        metrics = copy.deepcopy(getattr(self.trainer, "_metrics", None))  # TRL trainers record metrics in compute_loss
        device = self.trainer.args.device
        rng_devices = [device.index or 0] if device.type == "cuda" else []

        def loss_with(batch, count=None) -> float:
            kwargs = {} if count is None else {"num_items_in_batch": count}
            return float(self.trainer.compute_loss(model, dict(batch), **kwargs).detach().float().mean())

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
                        join=self.join_rows,
                    )
                    if kind == "mixed" and result.rule is not None and not distributed:
                        # Weighted without a count, one micro-batch must give what the Trainer trains it on.
                        one = batches[0]
                        given = loss_with(one, self.trainer._get_num_items_in_batch([one], device))
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
                self.trainer._metrics = metrics

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
        window_scaling = self._host_scaling(num_items_in_batch, response, micro_batches=len(batch_samples))
        if response is not None and response.kind == "unknown":
            why = "no micro-batch gave a finite, non-zero loss with `num_items_in_batch`"
            return self._measure_again(name, why, host_scaling, window_scaling)
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
            return self._measure_again(name, result.reason, host_scaling, window_scaling)
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
        model = self.trainer.model
        params = [p for p in model.parameters() if p.requires_grad]
        distributed = self.trainer.accelerator.num_processes > 1

        def project(batch, given=None) -> torch.Tensor | None:
            kwargs = {} if given is None else {"num_items_in_batch": given}
            with torch.enable_grad():
                loss = self.trainer.compute_loss(model, dict(batch), **kwargs).float().mean()
                if not loss.requires_grad:
                    return None
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            return project_on_random_signs(grads, GRADIENT_DIRECTIONS)

        try:
            error = None
            if params and not self.trainer.is_fsdp_enabled:
                error = split_gradient_error(
                    project, batches, rule, count, allow_join=not distributed, join=self.join_rows
                )
        except Exception:  # a check that cannot run leaves the error unmeasured, the rule as it is
            error = None
        if distributed:  # every process decides alike: the largest error, or none measured when one lacks it
            error = self._reduce_max(torch.tensor([math.inf if error is None else error], dtype=torch.float64))
            error = None if math.isinf(error.item()) else error.item()
        return error

    def _measure_again(self, name: str, reason: str, host_scaling: str, window_scaling: str) -> bool | None:
        """A window that settles nothing (no labels in it, say): it keeps the host's scaling, and the next windows
        are measured again, up to `MAX_PROBE_WINDOWS`; then the host's scaling stays, with a warning."""
        self._probe_windows += 1
        if self._probe_windows >= MAX_PROBE_WINDOWS:
            return self._keep_host_scaling(name, reason, host_scaling)
        if self._probe_windows == 1:
            logger.warning(
                "hf_gradtools: could not establish how the loss of %s is normalised from the first window (%s); this "
                "window keeps %s's own loss scaling (%s), and the next ones are measured again (up to %d windows).",
                name,
                reason,
                self._host_name(),
                window_scaling,
                MAX_PROBE_WINDOWS,
            )
        return False  # the host's scaling for this window; measure again on the next one

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

    def _host_scaling(self, num_items_in_batch, response, micro_batches: int | None = None) -> str:
        """What the host's own scaling does to this loss, in words, for the log line that says it is kept: over a
        window of `micro_batches` (default: `gradient_accumulation_steps`)."""
        n = self.trainer.args.gradient_accumulation_steps if micro_batches is None else micro_batches
        one = "one micro-batch, its loss as it is: exact for a loss that is a mean over it"
        if self.trainer.loss_is_scaled_for_ga is None and (
            self.trainer.compute_loss_func is not None
            or (self.trainer.model_accepts_loss_kwargs and num_items_in_batch is not None)
        ):
            if response is not None and response.kind == "ignores":
                if n == 1:
                    return f"it passes `num_items_in_batch`, which this loss ignores; {one}"
                return (
                    f"it passes `num_items_in_batch`, which this loss ignores, and so adds the {n} micro-batch losses "
                    f"without dividing them by {n}: each step's gradient is about {n} times one batch's"
                )
            return "it passes `num_items_in_batch` and adds the micro-batch losses"
        if n == 1:
            return one
        return f"each micro-batch loss divided by {n}: exact only when the micro-batches weigh alike"

    def join_rows(self, a: dict, b: dict) -> dict | None:
        """Two one-row micro-batches as one batch of two rows, for the row probe: as they are when their shapes
        agree, else padded by the Trainer's data collator as it pads the rows of one batch (`None` when it cannot)."""
        joined = join_rows(a, b)
        if joined is not None or self.trainer.data_collator is None or batch_rows(a) != 1 or batch_rows(b) != 1:
            return joined
        if not all(isinstance(v, torch.Tensor) and v.dim() > 0 for batch in (a, b) for v in batch.values()):
            return None
        rows = [{key: value[0].cpu() for key, value in batch.items()} for batch in (a, b)]
        # Dataset rows reach a collator as tensors or as lists, as the dataset's format gives them: try both.
        for features in (rows, [{key: value.tolist() for key, value in row.items()} for row in rows]):
            try:
                joined = self.trainer.data_collator(features)
            except Exception:  # a collator that cannot pad these rows (`default_data_collator`) or wants others
                continue
            if isinstance(joined, Mapping) and joined.keys() == a.keys() and batch_rows(joined) == 2:
                return self.trainer._prepare_inputs(dict(joined))
        return None

    def _count_passed(
        self, name: str, rule: ItemRule | None, error: float | None, unmeasured: str, mixed: bool = False
    ) -> Accumulation:
        """The loss keeps getting `num_items_in_batch` and the Trainer's scaling; `rule`: the items it counts."""
        host = self._host_name()
        if rule is not None and rule.kind == "sum":
            rule = None  # a loss that is a sum without a count gets the Trainer's count, as the Trainer expects
        counted = self.trainer_count_rule()
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
        batch = self.trainer._prepare_inputs(dict(batch))
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
        reduced = tensor.to(self.trainer.args.device)
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.MAX)
        return reduced.to(tensor.device)

    def share_count(self, count: torch.Tensor, device) -> torch.Tensor:
        """A window's count on this process, summed and shared as the Trainer shares its `num_items_in_batch`."""
        args = self.trainer.args
        if args.average_tokens_across_devices and args.world_size > 1:
            count = self.trainer.accelerator.gather(count.to(device)).sum()
        elif args.n_gpu > 1:
            count = count // args.n_gpu
        count = count.to(device)
        if args.n_gpu > 1 and count.dim() == 0:
            count = count.unsqueeze(0).expand(args.n_gpu, -1)
        return count / (self.trainer.get_tp_size() * self.trainer.get_cp_size() * self.trainer.get_sp_size())
