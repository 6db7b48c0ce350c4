"""`GradTrainingArguments`: `TrainingArguments` plus the fields of the gradient tools."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .clipping import check_norm_type


@dataclass
class GradTrainingArguments(TrainingArguments):
    """`TrainingArguments` with layer freezing, clipping in any norm and gradient snapshots.

    Only the added fields are listed; every `TrainingArguments` field works as before.

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
        metadata={"help": "Clamp each gradient element to [-v, v] (applied before norm clipping). Default: off."},
    )
    grad_snapshot_steps: int = field(
        default=0,
        metadata={"help": "Record per-parameter gradient norms every N optimizer steps (0: never)."},
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("freeze_first_n_layers", "grad_snapshot_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        if not isinstance(self.freeze_embeddings, bool):
            raise ValueError(f"`freeze_embeddings` must be True or False, got {self.freeze_embeddings!r}.")
        self.clip_norm_type = check_norm_type(self.clip_norm_type, "clip_norm_type")
        value = self.clip_grad_value
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
        ):
            raise ValueError(f"`clip_grad_value` must be a positive finite number or None (off), got {value!r}.")
        if self.max_grad_norm is None or self.max_grad_norm < 0 or math.isnan(self.max_grad_norm):
            raise ValueError(f"`max_grad_norm` must be >= 0 (0 turns norm clipping off), got {self.max_grad_norm!r}.")

    def to_dict(self) -> dict[str, Any]:
        """As `TrainingArguments.to_dict`, with an infinite `clip_norm_type` written as "inf" so JSON stays valid."""
        d = super().to_dict()
        if math.isinf(d["clip_norm_type"]):
            d["clip_norm_type"] = "inf"
        return d

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments) -> GradTrainingArguments:
        """Convert a plain `TrainingArguments`; the added fields take their defaults."""
        if isinstance(args, cls):
            return args
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
        return cls(**values)
