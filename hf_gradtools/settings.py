"""The gradient-tool settings of one run, resolved once from any `TrainingArguments` and validated in one place.

`GradSettings.from_args(args)` reads each field of `GradArgumentsMixin` from `args`, or its default where `args`
lacks it (a plain `TrainingArguments`, a foreign arguments class, `None`), checks every value (raising a
`ValueError` that names the field, the value and what is allowed) and returns a frozen dataclass. The components
read its attributes, so a misspelt field fails loudly instead of reading a default:

    >>> from transformers import TrainingArguments
    >>> settings = GradSettings.from_args(TrainingArguments("out", report_to="none"))
    >>> settings == GradSettings(), settings.clip_norm_type
    (True, 2.0)
    >>> settings.clip_nrom_type
    Traceback (most recent call last):
    ...
    AttributeError: 'TrainingArguments' object has no attribute 'clip_nrom_type'

An attribute that is not a gradient-tool field (`max_grad_norm`, a field of your own arguments subclass) reads
through to the run's arguments (`settings.args`), as a registered `ClipAlgorithm.from_args` expects.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .accumulation import LOSS_NORMALIZATIONS
from .clipping import AutoClip, check_clip_algorithm, check_norm_type
from .clipping.agc import check_agc_settings
from .clipping.zclip import check_zclip_settings
from .engines import check_optimizer_fields
from .errors import shown_setting
from .guards import NonFiniteGuard
from .patterns import compile_patterns

# Fields holding a list of regex patterns; `None` reads as no pattern.
PATTERN_FIELDS = ("agc_exclude", "grad_snapshot_tensors")


def check_trainer_fields(args: Any) -> None:
    """Refuse the Trainer's own fields that accumulation and the step count rest on, where the Trainer would fail
    inside `train()` or silently train nothing: `gradient_accumulation_steps` and `per_device_train_batch_size`
    (integers of at least 1; -1 accumulation steps gives 0 optimizer steps) and `learning_rate` (finite, not
    negative).

    Raises:
        ValueError: naming the field, the value and what is allowed.
    """
    for name in ("gradient_accumulation_steps", "per_device_train_batch_size"):
        value = getattr(args, name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer of at least 1, got {shown_setting(value)}.")
    rate = getattr(args, "learning_rate", 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < math.inf:
        raise ValueError(f"`learning_rate` must be a finite number of at least 0, got {shown_setting(rate)}.")


@dataclass(frozen=True)
class GradSettings:
    """The fields of `GradArgumentsMixin` (documented there), with their defaults, and the arguments they came from.

    Build it with `from_args`; `GradSettings()` is a run at the defaults.
    """

    freeze_embeddings: bool = False
    freeze_first_n_layers: int = 0
    clip_norm_type: float = 2.0
    clip_grad_value: float | None = None
    grad_snapshot_steps: int = 0
    loss_normalization: str = "auto"
    grad_snapshot_total_limit: int | None = None
    layerwise_lr_decay: float | None = None
    gradual_unfreeze_steps: int = 0
    frozen_eval_mode: bool = False
    log_grad_noise_scale: bool = False
    grad_noise_scale_beta: float = 0.95
    clip_algorithm: str = "norm"
    agc_clip_factor: float = 0.01
    agc_eps: float = 1e-3
    agc_exclude: list[str] = field(default_factory=list)
    autoclip_percentile: float = 10.0
    skip_nonfinite_grads: bool = False
    max_nonfinite_skips: int = 10
    log_grad_norms: bool = False
    grad_snapshot_tensors: list[str] = field(default_factory=list)
    # the spike guard
    zclip_alpha: float = 0.97
    zclip_z_threshold: float = 2.5
    zclip_warmup_steps: int = 25
    skip_spike_steps: bool = False
    spike_window: int = 128
    spike_sigma: float = 6.0
    spike_min_history: int = 20
    max_spike_skips: int = 10
    # automatic freezing and the activation cache
    auto_freeze: bool = False
    auto_freeze_interval: int = 50
    auto_freeze_percentile: float = 50.0
    auto_freeze_keep_last: int = 1
    cache_frozen_activations: bool = False
    frozen_activation_cache_gb: float = 4.0
    # The arguments these were read from (`None`: the defaults); not part of equality.
    args: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_args(cls, args: Any) -> GradSettings:
        """The settings of `args` (any `TrainingArguments`, or `None`), checked.

        Normalises in place, where `args` has the field: `clip_norm_type` to a float ("inf" -> `math.inf`), and a
        pattern list given as `None` (`agc_exclude`, `grad_snapshot_tensors`) to `[]`.

        Raises:
            ValueError: naming the first field whose value is not allowed, the value, and what is.
        """
        if args is None:
            return cls()
        max_norm = getattr(args, "max_grad_norm", 0.0)  # `None` passes here, as by the Trainer: `train()` names it
        if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, (int, float))):
            raise ValueError(
                f"`max_grad_norm` must be a number (0 or less turns norm clipping off), got {shown_setting(max_norm)}."
            )
        check_trainer_fields(args)
        for name in PATTERN_FIELDS:
            if getattr(args, name, []) is None:
                setattr(args, name, [])
        values = {}
        for f in dataclasses.fields(cls):
            if f.name == "args":
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = getattr(args, f.name, default)
            values[f.name] = list(value) if f.name in PATTERN_FIELDS and isinstance(value, (list, tuple)) else value
        settings = cls(**values, args=args)
        norm_type = settings._validate()
        if hasattr(args, "clip_norm_type"):
            args.clip_norm_type = norm_type
        return dataclasses.replace(settings, clip_norm_type=norm_type)

    @classmethod
    def of(cls, args_or_settings: Any) -> GradSettings:
        """`args_or_settings` if it is a `GradSettings` already, else `from_args` of it."""
        return args_or_settings if isinstance(args_or_settings, GradSettings) else cls.from_args(args_or_settings)

    def __getattr__(self, name: str) -> Any:
        # Only called for a name that is not a field: read it from the run's arguments.
        args = self.__dict__.get("args")
        if args is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(args, name)

    def freezing(self) -> dict[str, Any]:
        """The freeze settings, by field name (recorded in a checkpoint and checked on resume)."""
        return {"freeze_embeddings": self.freeze_embeddings, "freeze_first_n_layers": self.freeze_first_n_layers}

    # ---- validation, in one place ----

    def _validate(self) -> float:
        """Check every field; return `clip_norm_type` as a float."""
        _non_negative_int("freeze_first_n_layers", self.freeze_first_n_layers)
        _non_negative_int("grad_snapshot_steps", self.grad_snapshot_steps)
        _boolean("freeze_embeddings", self.freeze_embeddings)
        norm_type = check_norm_type(self.clip_norm_type, "clip_norm_type")
        value = self.clip_grad_value
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
        ):
            raise ValueError(
                f"`clip_grad_value` must be a positive finite number or None (off), got {shown_setting(value)}."
            )
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"`loss_normalization` must be one of {', '.join(LOSS_NORMALIZATIONS)}, got "
                f"{self.loss_normalization!r}."
            )
        limit = self.grad_snapshot_total_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(
                "`grad_snapshot_total_limit` must be a positive integer or None (keep all), got "
                f"{shown_setting(limit)}."
            )
        # clipping algorithms, guards, monitoring
        check_clip_algorithm(self.clip_algorithm)
        check_agc_settings(self.agc_clip_factor, self.agc_eps, self.agc_exclude)
        AutoClip(self.autoclip_percentile)
        NonFiniteGuard(self.max_nonfinite_skips)
        _boolean("skip_nonfinite_grads", self.skip_nonfinite_grads)
        _boolean("log_grad_norms", self.log_grad_norms)
        compile_patterns(self.grad_snapshot_tensors, "grad_snapshot_tensors")
        self._validate_spike_guard()
        self._validate_schedules()
        self._validate_auto_freeze()
        return norm_type

    def _validate_schedules(self) -> None:
        """Check `layerwise_lr_decay`, `gradual_unfreeze_steps`, `frozen_eval_mode` and the noise-scale fields."""
        args = self.args
        if self.layerwise_lr_decay is not None:
            check_layerwise_lr_decay(self.layerwise_lr_decay)
        _non_negative_int("gradual_unfreeze_steps", self.gradual_unfreeze_steps)
        _boolean("frozen_eval_mode", self.frozen_eval_mode)
        _boolean("log_grad_noise_scale", self.log_grad_noise_scale)
        beta = self.grad_noise_scale_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"`grad_noise_scale_beta` must be a number in [0, 1), got {shown_setting(beta)}.")
        steps = self.gradual_unfreeze_steps
        if steps:
            if not self.freeze_embeddings and not self.freeze_first_n_layers:
                raise ValueError(
                    f"`gradual_unfreeze_steps`={steps} but nothing is frozen: set `freeze_embeddings` and/or "
                    "`freeze_first_n_layers`, whose blocks it then unfreezes one by one, or leave it at 0."
                )
            scheduler = getattr(args, "lr_scheduler_type", "linear")
            scheduler = getattr(scheduler, "value", scheduler)
            if scheduler in ("reduce_lr_on_plateau", "greedy"):
                raise ValueError(
                    f"`gradual_unfreeze_steps`={steps} cannot add parameters under `lr_scheduler_type`="
                    f"{scheduler!r}, which keeps no per-group schedule; use any other scheduler (e.g. linear, cosine, "
                    "constant)."
                )
        accumulation = getattr(args, "gradient_accumulation_steps", 1)
        if self.log_grad_noise_scale and accumulation < 2:
            raise ValueError(
                "`log_grad_noise_scale`=True needs `gradient_accumulation_steps` >= 2 (the noise scale compares the "
                f"first micro-batch's gradient with the whole window's), got {accumulation}."
            )
        check_optimizer_fields(self, args)

    def _validate_spike_guard(self) -> None:
        """Check the ZClip fields (`zclip_*`) and the skip-on-spike fields (`skip_spike_steps`, `spike_*`)."""
        check_zclip_settings(self.zclip_alpha, self.zclip_z_threshold, self.zclip_warmup_steps)
        _boolean("skip_spike_steps", self.skip_spike_steps)
        _positive_int("spike_window", self.spike_window)
        _in_range("spike_sigma", self.spike_sigma, 0, math.inf, "a finite positive number", True, True)
        _positive_int("spike_min_history", self.spike_min_history)
        _positive_int("max_spike_skips", self.max_spike_skips)
        if self.spike_min_history > self.spike_window:
            raise ValueError(
                f"`spike_min_history`={self.spike_min_history} must be at most `spike_window`={self.spike_window}: "
                "the history never holds more than the window."
            )

    def _validate_auto_freeze(self) -> None:
        """Check the automatic-freezing fields (`auto_freeze*`) and the activation cache's."""
        _boolean("auto_freeze", self.auto_freeze)
        _positive_int("auto_freeze_interval", self.auto_freeze_interval)
        _in_range("auto_freeze_percentile", self.auto_freeze_percentile, 0, 100, "a number in (0, 100]", low_open=True)
        _positive_int("auto_freeze_keep_last", self.auto_freeze_keep_last)
        _boolean("cache_frozen_activations", self.cache_frozen_activations)
        _in_range(
            "frozen_activation_cache_gb",
            self.frozen_activation_cache_gb,
            0,
            math.inf,
            "a positive finite number of GB",
            low_open=True,
            high_open=True,
        )
        if self.auto_freeze and self.gradual_unfreeze_steps:
            raise ValueError(
                f"`auto_freeze`=True and `gradual_unfreeze_steps`={self.gradual_unfreeze_steps} work in opposite "
                "directions (one freezes blocks as training goes, the other unfreezes them): use one of them."
            )
        if self.cache_frozen_activations and not self.frozen_eval_mode:
            raise ValueError(
                "`cache_frozen_activations`=True needs `frozen_eval_mode`=True: a frozen block's output can be kept "
                "only when it is deterministic (no dropout in it). Set `frozen_eval_mode`=True as well."
            )


def check_layerwise_lr_decay(decay: float, field: str = "layerwise_lr_decay") -> float:
    """Return `decay` as a float, or raise a `ValueError` naming `field` unless 0 < decay <= 1."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or math.isnan(decay) or not 0 < decay <= 1:
        raise ValueError(f"`{field}` must be a number in (0, 1] (1 turns the decay off), got {shown_setting(decay)}.")
    return float(decay)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {shown_setting(value)}.")


def _in_range(
    name: str, value: Any, low: float, high: float, allowed: str, low_open: bool = False, high_open: bool = False
) -> None:
    """Refuse `value` unless it is a real number between `low` and `high` (open ends where asked)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"`{name}` must be {allowed}, got {shown_setting(value)}.")


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {shown_setting(value)}.")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {shown_setting(value)}.")
