"""The fields of the gradient tools, as a dataclass mixin for any `TrainingArguments` class.

`GradArgumentsMixin` composes with every arguments class of the Hugging Face ecosystem, listed first:

    >>> from dataclasses import dataclass
    >>> from transformers import Seq2SeqTrainingArguments
    >>> @dataclass
    ... class MySeq2SeqArguments(GradArgumentsMixin, Seq2SeqTrainingArguments):
    ...     pass
    >>> MySeq2SeqArguments("out", freeze_first_n_layers=2, predict_with_generate=True).freeze_first_n_layers
    2

`GradTrainer` also takes a plain `TrainingArguments` (or any subclass) as it is: the settings of a run are resolved
once, `settings.GradSettings.from_args(args)`, where a field the object lacks reads as its default, and every value
is validated there, in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from .accumulation import LOSS_NORMALIZATIONS
from .clipping import CLIP_ALGORITHMS
from .settings import GradSettings


@dataclass
class GradArgumentsMixin:
    """The fields of the gradient tools. Every field of the host arguments class works as before.

    Args:
        freeze_embeddings (`bool`, *optional*, defaults to `False`):
            Freeze the model's input embedding block (word, position and token-type embeddings and their
            LayerNorm, where the architecture groups them in one module).
        freeze_first_n_layers (`int`, *optional*, defaults to `0`):
            Freeze the first N blocks of the main layer stack (the encoder's, for encoder-decoder models).
        clip_norm_type (`float`, *optional*, defaults to `2.0`):
            The norm used with `max_grad_norm` and reported as `grad_norm`: any positive number, or `inf`.
        clip_grad_value (`float`, *optional*):
            Clamp every gradient element to `[-v, v]`, before norm clipping when both are set.
        grad_snapshot_steps (`int`, *optional*, defaults to `0`):
            Record each trainable parameter's gradient norm every N optimizer steps (0: never).
        loss_normalization (`str`, *optional*, defaults to `"auto"`):
            How the loss of one micro-batch is normalised, for exact gradient accumulation: `auto` (measured on the
            first window), `token`, `shifted_token`, `sample`, `element`, `sum`, or `trainer` (keep the Trainer's
            own scaling).
        grad_snapshot_total_limit (`int`, *optional*):
            Keep only the newest N gradient snapshots of each snapshot folder, deleting older ones (their JSON and
            tensor files together) after each write; unset keeps all.
        layerwise_lr_decay (`float`, *optional*):
            Layer-wise learning-rate decay in (0, 1]: block i of N trains at `learning_rate * d**(N - 1 - i)`, the
            embeddings at `learning_rate * d**N`, the rest (head, pooler, final norms) at `learning_rate`.
        gradual_unfreeze_steps (`int`, *optional*, defaults to `0`):
            Every N optimizer steps unfreeze the highest block that `freeze_first_n_layers` froze, the embeddings
            last; the new parameters join the live optimizer (0: off).
        frozen_eval_mode (`bool`, *optional*, defaults to `False`):
            Keep frozen modules in eval mode while training (no dropout in them, BatchNorm statistics fixed).
        log_grad_noise_scale (`bool`, *optional*, defaults to `False`):
            Log `grad_noise_scale`, the gradient noise scale (critical batch size, in items) of McCandlish et al.
            2018, from the first micro-batch and the whole window; needs `gradient_accumulation_steps >= 2`.
        grad_noise_scale_beta (`float`, *optional*, defaults to `0.95`):
            Decay of the moving averages behind `grad_noise_scale`, in [0, 1).
        clip_algorithm (`str`, *optional*, defaults to `"norm"`):
            `norm` (`max_grad_norm` in `clip_norm_type`), `agc` (adaptive gradient clipping, unit-wise, relative to
            the weights), `autoclip` (to a percentile of all past norms), `zclip` (a norm far above its running mean,
            back towards it), or the name of an algorithm registered with `register_clip_algorithm`;
            `clip_grad_value` applies first to each.
        agc_clip_factor (`float`, *optional*, defaults to `0.01`), agc_eps (`float`, *optional*, defaults to `1e-3`):
            AGC's `lambda` and its floor of the weight norm.
        agc_exclude (`list[str]`, *optional*, defaults to `[]`):
            Regex name patterns of parameters AGC leaves unclipped; empty: the model's task head.
        autoclip_percentile (`float`, *optional*, defaults to `10.0`):
            AutoClip's percentile, in (0, 100].
        skip_nonfinite_grads (`bool`, *optional*, defaults to `False`):
            Skip an optimizer step (and its scheduler step) whose gradients hold NaN or Inf.
        max_nonfinite_skips (`int`, *optional*, defaults to `10`):
            Stop training after this many consecutive skipped steps.
        log_grad_norms (`bool`, *optional*, defaults to `False`):
            Log per-layer gradient norms, `grad_norm_post_clip` and `clip_coef` at every logging step.
        grad_snapshot_tensors (`list[str]`, *optional*, defaults to `[]`):
            Regex name patterns of parameters whose gradient tensors are saved with each snapshot.
        zclip_alpha (`float`, *optional*, defaults to `0.97`), zclip_z_threshold (`float`, *optional*, defaults to
        `2.5`), zclip_warmup_steps (`int`, *optional*, defaults to `25`):
            `clip_algorithm="zclip"` (Kumar et al. 2025): the EMA decay of the gradient norm's mean and variance, the
            z-score above which a norm is clipped, and the steps whose norms start the statistics.
        skip_spike_steps (`bool`, *optional*, defaults to `False`):
            Skip an optimizer step whose loss or pre-clip gradient norm exceeds mean + `spike_sigma` standard
            deviations of the last `spike_window` steps (once `spike_min_history` exist); logs `spike_skips`.
        spike_window (`int`, *optional*, defaults to `128`), spike_sigma (`float`, *optional*, defaults to `6.0`),
        spike_min_history (`int`, *optional*, defaults to `20`), max_spike_skips (`int`, *optional*, defaults to `10`):
            The spike guard's history length, threshold, the history it needs before deciding, and the consecutive
            skips after which training stops.
        auto_freeze (`bool`, *optional*, defaults to `False`):
            Freeze the layer stack's leading blocks as training goes, once their gradient norms stop changing
            (AutoFreeze, Liu et al. 2021); logs `frozen_layers`.
        auto_freeze_interval (`int`, *optional*, defaults to `50`), auto_freeze_percentile (`float`, *optional*,
        defaults to `50.0`), auto_freeze_keep_last (`int`, *optional*, defaults to `1`):
            Optimizer steps per decision, the percentile of the blocks' relative change below which a block freezes,
            and the top blocks never frozen.
        cache_frozen_activations (`bool`, *optional*, defaults to `False`), frozen_activation_cache_gb (`float`,
        *optional*, defaults to `4.0`):
            Keep each training example's output of the frozen prefix (embeddings and first blocks, in eval mode:
            needs `frozen_eval_mode`) and skip computing it again; the cache's memory budget.

    Example:
        >>> args = GradTrainingArguments("out", freeze_embeddings=True, freeze_first_n_layers=2,
        ...     max_grad_norm=1.0, clip_norm_type=float("inf"), grad_snapshot_steps=10)
    """

    freeze_embeddings: bool = field(
        default=False,
        metadata={"help": "Freeze the model's input embedding block (word, position and token-type embeddings)."},
    )
    freeze_first_n_layers: int = field(
        default=0,
        metadata={"help": "Freeze the first N transformer blocks of the main layer stack (encoder for seq2seq)."},
    )
    clip_norm_type: float = field(
        default=2.0,
        metadata={
            "help": "Norm type for `max_grad_norm` clipping and the logged `grad_norm`: a positive number or inf."
        },
    )
    clip_grad_value: float | None = field(
        default=None,
        metadata={"help": "Clamp each gradient element to [-v, v] before norm clipping (unset: no value clipping)."},
    )
    grad_snapshot_steps: int = field(
        default=0,
        metadata={"help": "Record per-parameter gradient norms every N optimizer steps (0: never)."},
    )
    loss_normalization: str = field(
        default="auto",
        metadata={
            "help": "How one micro-batch's loss is normalised, for exact gradient accumulation: auto (measured), "
            "token, shifted_token, sample, element, sum, or trainer (keep the Trainer's own loss scaling).",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )
    # ---- retention ----
    grad_snapshot_total_limit: int | None = field(
        default=None,
        metadata={"help": "Keep only the newest N gradient snapshots, deleting older ones (unset: keep all)."},
    )
    # ---- schedules, noise scale ----
    layerwise_lr_decay: float | None = field(
        default=None,
        metadata={
            "help": "Layer-wise learning-rate decay d in (0, 1]: block i of N trains at lr * d**(N-1-i), the "
            "embeddings at lr * d**N, the head at lr (unset: off)."
        },
    )
    gradual_unfreeze_steps: int = field(
        default=0,
        metadata={
            "help": "Every N optimizer steps unfreeze the highest frozen block, the embeddings last, into the live "
            "optimizer (0: off; needs freeze_embeddings or freeze_first_n_layers)."
        },
    )
    frozen_eval_mode: bool = field(
        default=False,
        metadata={"help": "Keep frozen modules in eval mode during training (no dropout, fixed BatchNorm stats)."},
    )
    log_grad_noise_scale: bool = field(
        default=False,
        metadata={
            "help": "Log `grad_noise_scale`, the gradient noise scale (critical batch size, in items); needs "
            "gradient_accumulation_steps >= 2."
        },
    )
    grad_noise_scale_beta: float = field(
        default=0.95,
        metadata={"help": "Decay of the moving averages behind `grad_noise_scale`, in [0, 1)."},
    )
    # ---- clipping algorithms, guards, monitoring ----
    clip_algorithm: str = field(
        default="norm",
        metadata={
            "help": "How the gradient is clipped after `clip_grad_value`: norm (`max_grad_norm` in "
            "`clip_norm_type`), agc (adaptive, unit-wise, relative to the weights), autoclip (to a percentile of "
            "all past gradient norms), zclip (a norm far above its running mean, back towards it), or an algorithm "
            "registered with `hf_gradtools.register_clip_algorithm`.",
            "choices": CLIP_ALGORITHMS,  # the registry's names, read when the value is checked
        },
    )
    agc_clip_factor: float = field(
        default=0.01,
        metadata={"help": "AGC: each unit's gradient norm is kept at most this times its weight norm (lambda)."},
    )
    agc_eps: float = field(
        default=1e-3,
        metadata={"help": "AGC: floor of a unit's weight norm, so zero-initialised weights can still move."},
    )
    agc_exclude: list[str] = field(
        default_factory=list,
        metadata={
            "help": "AGC: regex name patterns of parameters left unclipped (empty: the model's task head, as in "
            "the paper)."
        },
    )
    autoclip_percentile: float = field(
        default=10.0,
        metadata={"help": "AutoClip: clip to this percentile (0 to 100] of every gradient norm seen so far."},
    )
    skip_nonfinite_grads: bool = field(
        default=False,
        metadata={
            "help": "Skip the optimizer and scheduler step when a gradient holds NaN or Inf (the step still counts "
            "in global_step), and log `nonfinite_skips`."
        },
    )
    max_nonfinite_skips: int = field(
        default=10,
        metadata={"help": "Stop training after this many consecutive steps skipped for non-finite gradients."},
    )
    log_grad_norms: bool = field(
        default=False,
        metadata={
            "help": "Add per-layer gradient norms (`grad_norm/embeddings`, `grad_norm/layer.<i>`, `grad_norm/head`), "
            "`grad_norm_post_clip` and `clip_coef` to the logs."
        },
    )
    grad_snapshot_tensors: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Regex name patterns of parameters whose full gradient tensors are saved with each snapshot "
            "(grad_snapshots/step-N.safetensors)."
        },
    )

    # ---- the spike guard ----
    zclip_alpha: float = field(
        default=0.97, metadata={"help": "ZClip: EMA decay of the gradient norm's mean and variance, in (0, 1)."}
    )
    zclip_z_threshold: float = field(
        default=2.5, metadata={"help": "ZClip: clip a gradient norm whose z-score exceeds this (> 0)."}
    )
    zclip_warmup_steps: int = field(
        default=25, metadata={"help": "ZClip: optimizer steps whose norms start the statistics (>= 1)."}
    )
    skip_spike_steps: bool = field(
        default=False,
        metadata={
            "help": "Skip an optimizer step whose loss or gradient norm exceeds mean + spike_sigma std of the "
            "recent steps; logs `spike_skips`."
        },
    )
    spike_window: int = field(default=128, metadata={"help": "Spike guard: steps of history (>= 1)."})
    spike_sigma: float = field(default=6.0, metadata={"help": "Spike guard: standard deviations above the mean."})
    spike_min_history: int = field(
        default=20, metadata={"help": "Spike guard: steps of history needed before a step can be skipped."}
    )
    max_spike_skips: int = field(
        default=10, metadata={"help": "Stop training after this many consecutive steps skipped as spikes."}
    )
    # ---- automatic freezing, activation cache ----
    auto_freeze: bool = field(
        default=False,
        metadata={"help": "Freeze leading blocks once their gradient norms stop changing; logs `frozen_layers`."},
    )
    auto_freeze_interval: int = field(
        default=50, metadata={"help": "Automatic freezing: optimizer steps per decision (>= 1)."}
    )
    auto_freeze_percentile: float = field(
        default=50.0,
        metadata={"help": "Automatic freezing: percentile (0, 100] of the blocks' relative norm change."},
    )
    auto_freeze_keep_last: int = field(
        default=1, metadata={"help": "Automatic freezing: the top blocks that are never frozen (>= 1)."}
    )
    cache_frozen_activations: bool = field(
        default=False,
        metadata={
            "help": "Keep each training example's output of the frozen prefix and skip computing it again "
            "(needs frozen_eval_mode)."
        },
    )
    frozen_activation_cache_gb: float = field(
        default=4.0, metadata={"help": "Memory budget of the frozen-activation cache, in GB (> 0)."}
    )

    def __post_init__(self):
        super().__post_init__()
        GradSettings.from_args(self)  # checks every field (and normalises `clip_norm_type` and the pattern lists)

    def to_dict(self) -> dict[str, Any]:
        """As the host's `to_dict`, with an infinite `clip_norm_type` written as "inf" so JSON stays valid."""
        d = super().to_dict()
        if isinstance(d.get("clip_norm_type"), float) and math.isinf(d["clip_norm_type"]):
            d["clip_norm_type"] = "inf"
        return d


@dataclass
class GradTrainingArguments(GradArgumentsMixin, TrainingArguments):
    """`TrainingArguments` with the fields of `GradArgumentsMixin`."""


@dataclass
class GradSeq2SeqTrainingArguments(GradArgumentsMixin, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` with the fields of `GradArgumentsMixin`."""
