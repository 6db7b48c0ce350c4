"""Exact gradient accumulation: N micro-batches give the gradient of one batch N times larger.

| module | what |
|---|---|
| `weights.py` | `ItemRule`, `count_items`, `micro_batch_loss_divisors`: what a loss averages over, and what each micro-batch's loss is divided by |
| `loss_probe.py` | `probe_loss_normalization`, `probe_count_response`, `split_gradient_error`: measuring a loss's normalisation |
| `probe.py` | `LossRuleProbe`: the probes run on a trainer's first window, deciding how its loss is accumulated |
"""  # noqa: E501

from .loss_probe import (
    GRADIENT_DIRECTIONS,
    CountResponse,
    ProbeResult,
    describe_error,
    join_rows,
    probe_count_response,
    probe_loss_normalization,
    project_on_random_signs,
    split_gradient_error,
)
from .weights import (
    DECLARED_RULES,
    ELEMENT,
    IGNORE_INDEX,
    LOSS_NORMALIZATIONS,
    SAMPLE,
    SHIFTED_TOKEN,
    SUM,
    TOKEN,
    Accumulation,
    ItemRule,
    batch_rows,
    count_items,
    label_tensor,
    micro_batch_loss_divisors,
    micro_batch_loss_weights,
    weighted_loss,
    window_count,
)

__all__ = [
    "DECLARED_RULES",
    "ELEMENT",
    "GRADIENT_DIRECTIONS",
    "IGNORE_INDEX",
    "LOSS_NORMALIZATIONS",
    "SAMPLE",
    "SHIFTED_TOKEN",
    "SUM",
    "TOKEN",
    "Accumulation",
    "CountResponse",
    "ItemRule",
    "ProbeResult",
    "batch_rows",
    "count_items",
    "describe_error",
    "join_rows",
    "label_tensor",
    "micro_batch_loss_divisors",
    "micro_batch_loss_weights",
    "probe_count_response",
    "probe_loss_normalization",
    "project_on_random_signs",
    "split_gradient_error",
    "weighted_loss",
    "window_count",
]
