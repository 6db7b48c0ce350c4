"""Loss weights that make gradient accumulation equal one large batch.

A micro-batch's loss, as the model (or `compute_loss`) returns it without `num_items_in_batch`, is normalised
in one of a few ways, each an `ItemRule`:

- `token`: the mean over label tokens that are not ignored (-100, or a head's own ignore index such as 255 for
  semantic segmentation): masked LM, token classification, seq2seq, single-label classification (one token a row);
- `shifted_token`: the same after the one-token shift of causal LM losses (position 0 is never a target);
- `sample`: the mean over rows (question answering, CTC with `ctc_loss_reduction="mean"`);
- `element`: the mean over the elements of a float label tensor (regression, multi-label);
- `sum`: not normalised (CTC with `ctc_loss_reduction="sum"`).

For the mean rules, weighting each micro-batch's loss by `items_in_micro_batch / items_in_window` (dividing it by
the reciprocal, which is exactly N for N equal micro-batches, as the Trainer divides) turns the sum of
the micro-batch losses into the mean over the whole window, whatever the micro-batch sizes, and so the accumulated
gradient into the gradient of that mean. A summed loss is already additive: its weight is 1. Under data
parallelism the window spans all processes and every weight is multiplied by the world size, because DDP
averages the gradients of the processes.

A loss that divides by `num_items_in_batch` (the Trainer's contract) is not weighted: it gets the window's count of
its rule's items (`window_count`) and the Trainer's scaling, which is the same weight carried by the count.
`Accumulation` records which of the two a loss gets.

Example:
    >>> import torch
    >>> batches = [{"labels": torch.tensor([0, 1, 1])}, {"labels": torch.tensor([1])}]
    >>> micro_batch_loss_weights(batches, TOKEN).tolist()
    [0.75, 0.25]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

#: Values of `loss_normalization`: `auto` measures the rule, `trainer` keeps the Trainer's own scaling.
LOSS_NORMALIZATIONS = ("auto", "token", "shifted_token", "sample", "element", "sum", "trainer")


@dataclass(frozen=True)
class ItemRule:
    """What one micro-batch's loss is a mean over (`kind` "token", "sample" or "element"), or "sum".

    Attributes:
        kind: "token", "sample", "element" or "sum".
        label_key: the key of the labels in a batch, when it is not `labels` (the Trainer's `label_names`).
        shift: for "token": the loss predicts token i+1 from token i, so position 0 is never a target.
        ignore_index: for "token": the label value that is not a target.
    """

    kind: str
    shift: bool = False
    ignore_index: int = IGNORE_INDEX
    label_key: str | None = None  # the batch key of the labels when it is not `labels` (`args.label_names`)

    @property
    def name(self) -> str:
        if self.kind != "token":
            return self.kind
        name = "shifted_token" if self.shift else "token"
        return name if self.ignore_index == IGNORE_INDEX else f"{name} (ignore index {self.ignore_index})"


@dataclass(frozen=True)
class Accumulation:
    """How accumulation treats a loss: weighted by `rule`, or given a count.

    Attributes:
        rule: the items the loss is a mean over; `None` with `takes_count`: the Trainer's own count.
        takes_count: the loss divides by `num_items_in_batch` (the Trainer's contract): it gets the window's count
            of `rule`'s items and the Trainer's scaling, and is not weighted.
        declared: the `loss_normalization` it was declared as (`None`: measured).
    """

    rule: ItemRule | None
    takes_count: bool = False
    declared: str | None = None


TOKEN = ItemRule("token")
SHIFTED_TOKEN = ItemRule("token", shift=True)
SAMPLE = ItemRule("sample")
ELEMENT = ItemRule("element")
SUM = ItemRule("sum")
DECLARED_RULES = {"token": TOKEN, "shifted_token": SHIFTED_TOKEN, "sample": SAMPLE, "element": ELEMENT, "sum": SUM}


def label_tensor(batch: Mapping, key: str | None = None) -> torch.Tensor | None:
    """The tensor the loss is computed against: `key` if given, else `shift_labels` when a collator provides it,
    else `labels`."""
    for name in (key,) if key else ("shift_labels", "labels"):
        if isinstance(batch.get(name), torch.Tensor):
            return batch[name]
    return None


def batch_rows(batch: Mapping) -> int:
    """The number of rows of a batch: the first dimension of its first tensor of at least one dimension."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("Cannot count the rows of a batch that holds no tensor.")


def count_items(batch: Mapping, rule: ItemRule = TOKEN) -> torch.Tensor | int:
    """How many items `rule` says the loss over `batch` averages over (a device tensor for token counts)."""
    labels = label_tensor(batch, rule.label_key)
    if rule.kind == "sample" or labels is None:
        return batch_rows(batch)
    if rule.kind == "element" or labels.is_floating_point():
        return labels.numel()
    if rule.shift and "shift_labels" not in batch and rule.label_key is None:
        labels = labels[..., 1:]
    return labels.ne(rule.ignore_index).sum()


def window_count(batches: Sequence[Mapping], rule: ItemRule) -> torch.Tensor:
    """The number of `rule`'s items in `batches` (one window on this process), as an int64 tensor on their device.

    For a loss that divides by `num_items_in_batch`: the count of the items its own normalisation counts.
    """
    device = next((v.device for v in batches[0].values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    counts = [count_items(batch, rule) for batch in batches]
    return torch.stack(
        [
            c.to(device=device, dtype=torch.int64)
            if isinstance(c, torch.Tensor)
            else torch.full((), c, device=device, dtype=torch.int64)
            for c in counts
        ]
    ).sum()


def micro_batch_loss_divisors(
    batches: Sequence[Mapping],
    rule: ItemRule = TOKEN,
    world_size: int = 1,
    gather_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """What each micro-batch's loss is divided by so that their sum is the loss of the whole window as one batch:
    `items_in_window / (items_in_micro_batch * world_size)`, the reciprocal of its weight.

    Args:
        batches: the micro-batches of one optimizer step on this process.
        rule: how each micro-batch's loss is normalised (see the module docstring).
        world_size: number of data-parallel processes whose gradients are averaged.
        gather_sum: sums a 0-d tensor over the processes; required when `world_size > 1` for a mean rule.

    Returns:
        A float64 tensor of one divisor per micro-batch, on the batches' device: `inf` for a micro-batch without
        items (it adds nothing). Micro-batches of equal counts on one process get exactly N, the Trainer's divisor,
        so a loss divided by it is the Trainer's to the bit. Nothing is read back to the host.
    """
    if not batches:
        return torch.zeros(0, dtype=torch.float64)
    device = next((v.device for v in batches[0].values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    if rule.kind == "sum":
        return torch.full((len(batches),), 1.0 / world_size, device=device, dtype=torch.float64)
    counts = [count_items(b, rule) for b in batches]
    # Python counts become device scalars through a fill kernel rather than a blocking host-to-device copy.
    counts_t = torch.stack(
        [
            c.to(device=device, dtype=torch.float64)
            if isinstance(c, torch.Tensor)
            else torch.full((), c, device=device, dtype=torch.float64)
            for c in counts
        ]
    )
    window = counts_t.sum()
    if world_size > 1:
        if gather_sum is None:
            raise ValueError("`gather_sum` is required when `world_size` > 1.")
        window = gather_sum(window)
    return window.clamp_min(1) / (counts_t * world_size)


def micro_batch_loss_weights(
    batches: Sequence[Mapping],
    rule: ItemRule = TOKEN,
    world_size: int = 1,
    gather_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The weight of each micro-batch's loss (its share of the window's items, times `world_size`): the float32
    reciprocal of `micro_batch_loss_divisors` (same arguments); 0 for a micro-batch without items."""
    return micro_batch_loss_divisors(batches, rule, world_size, gather_sum).reciprocal().float()


def weighted_loss(compute_loss, divisor: torch.Tensor):
    """`compute_loss` (a Trainer's, any signature) with its loss divided by `divisor` (`micro_batch_loss_divisors`);
    a micro-batch with no item (every label ignored) has a NaN mean and divisor `inf`: it adds 0, not NaN."""

    def weighted(*args, **kwargs):
        result = compute_loss(*args, **kwargs)
        loss, outputs = result if kwargs.get("return_outputs") else (result, None)
        d = divisor.to(loss.device, loss.dtype)
        loss = torch.where(torch.isfinite(d), loss / d, torch.zeros_like(loss))
        return (loss, outputs) if kwargs.get("return_outputs") else loss

    return weighted
