"""Measure how a loss is normalised, so that gradient accumulation can weight it exactly, or know that it cannot.

A loss that is a mean over some items (`accumulation.ItemRule`) is additive in a known way: split a batch in two
parts A and B, and `L(A+B) * c(A+B) = L(A) * c(A) + L(B) * c(B)` where `c` counts the items; a summed loss gives
`L(A+B) = L(A) + L(B)`. `probe_loss_normalization` evaluates the loss (in eval mode, without gradients) on such
splits of the first window and keeps the rules the numbers agree with:

- the row probe splits the rows of a micro-batch (or joins two one-row micro-batches of equal shapes); it tests
  every rule;
- the position probe keeps the even label positions of each row, then the odd ones (the rest set to the ignore
  index); it tests the token rules, and tells a causal LM's shifted loss (position 0 never a target)
  from an unshifted one by what the loss does, not by the model's class.

The first rule in priority order (shifted token, token, element, sample, sum) that passes every probe it was put
to wins. When no rule passes, or two rules pass with equal evidence but would weight the window differently, the
result is `None` and the caller keeps the Trainer's own scaling.

Example:
    >>> import torch
    >>> def mean_loss(batch):  # a per-token mean, as masked LM heads compute it
    ...     labels = batch["labels"]
    ...     return (batch["x"] * labels.ne(-100)).sum() / labels.ne(-100).sum()
    >>> x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    >>> labels = torch.tensor([[1, 1, -100], [1, 1, 1]])
    >>> probe_loss_normalization(mean_loss, [{"x": x, "labels": labels}]).rule.name
    'token'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .accumulation import (
    ELEMENT,
    IGNORE_INDEX,
    SAMPLE,
    SHIFTED_TOKEN,
    SUM,
    TOKEN,
    ItemRule,
    batch_rows,
    count_items,
    label_tensor,
)

MAX_PROBE_BATCHES = 4  # micro-batches tried per probe before the window counts as inconclusive
DECISIVE = 10.0  # a rival rule must fit at least this many times worse than the chosen one


@dataclass
class ProbeResult:
    """The measured rule (`None`: not established) and one sentence on how it was decided, for the log."""

    rule: ItemRule | None
    reason: str
    conclusive: bool = True  # False: these micro-batches could not tell; a later window may


def candidate_rules(
    batch: Mapping, ignore_indices: Sequence[int] = (), label_key: str | None = None
) -> list[ItemRule]:
    """The rules that could describe a loss over `batch`, in priority order.

    `ignore_indices`: label values other than -100 that a head ignores (e.g. `semantic_loss_ignore_index`).
    `label_key`: the batch key of the labels when it is not `labels`.
    """
    labels = label_tensor(batch, label_key)
    rules: list[ItemRule] = []
    if labels is not None and not labels.is_floating_point():
        if labels.dim() >= 2 and "shift_labels" not in batch:
            rules.append(SHIFTED_TOKEN)
        rules += [ItemRule("token", ignore_index=i) for i in ignore_indices if i != IGNORE_INDEX]
        rules.append(TOKEN)
    if labels is not None and labels.is_floating_point():
        rules.append(ELEMENT)
    return [dataclasses.replace(rule, label_key=label_key) for rule in rules + [SAMPLE, SUM]]


def split_rows(batch: Mapping, k: int) -> tuple[dict, dict] | None:
    """Rows `[:k]` and `[k:]` of every tensor of `batch`; `None` when a tensor is not laid out by rows."""
    rows = batch_rows(batch)
    first, second = {}, {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] != rows:
                return None
            first[key], second[key] = value[:k], value[k:]
        else:
            first[key] = second[key] = value
    return first, second


def join_rows(a: Mapping, b: Mapping) -> dict | None:
    """Two micro-batches as one, when they hold the same keys and tensors of the same trailing shapes."""
    if a.keys() != b.keys():
        return None
    joined = {}
    for key, value in a.items():
        other = b[key]
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if not isinstance(other, torch.Tensor) or value.shape[1:] != other.shape[1:]:
                return None
            joined[key] = torch.cat([value, other])
        elif isinstance(value, torch.Tensor) or value != other:
            return None
        else:
            joined[key] = value
    return joined


def mask_positions(batch: Mapping, keep_even: bool, ignore_index: int, label_key: str | None = None) -> dict:
    """`batch` with the odd (or even) label positions of each row set to `ignore_index`.

    Interleaved halves give both halves targets whenever a row has two or more, wherever they sit in the row.
    """
    key = label_key or ("shift_labels" if isinstance(batch.get("shift_labels"), torch.Tensor) else "labels")
    labels = batch[key]
    flat = labels.reshape(labels.shape[0], -1).clone()
    flat[:, 1 if keep_even else 0 :: 2] = ignore_index
    return {**batch, key: flat.reshape(labels.shape)}


def _row_probe_batches(batches: Sequence[Mapping], allow_join: bool) -> list[Mapping]:
    """Batches of two or more rows to split: the micro-batches, else pairs of one-row micro-batches joined."""
    found = [b for b in batches if batch_rows(b) > 1]
    if allow_join:
        pairs = (join_rows(a, b) for a, b in zip(batches[::2], batches[1::2], strict=False))
        found += [j for j in pairs if j is not None]
    return found


def _error(rule: ItemRule, whole: float, parts: Sequence[tuple[float, Mapping]]) -> float | None:
    """Relative distance between `whole` and what `rule` predicts from the parts' losses (`None`: cannot tell)."""
    if rule.kind == "sum":
        predicted = sum(loss for loss, _ in parts)
    else:
        counts = [float(count_items(batch, rule)) for _, batch in parts]
        if min(counts) <= 0:
            return None
        predicted = sum(loss * c for (loss, _), c in zip(parts, counts, strict=True)) / sum(counts)
    scale = max(abs(whole), *(abs(loss) for loss, _ in parts), 1e-12)
    return abs(predicted - whole) / scale


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def _tells_apart(rules: Sequence[ItemRule], parts: Sequence[Mapping]) -> bool:
    """Whether the mean rules among `rules` count the parts in different proportions (so a probe tells them apart)."""
    shares = set()
    for rule in rules:
        if rule.kind != "sum":
            counts = [float(count_items(part, rule)) for part in parts]
            shares.add(tuple(round(c / max(sum(counts), 1.0), 9) for c in counts))
    return len(shares) > 1


def _single_rows(batch: Mapping) -> list[dict]:
    """Each row of `batch` as a batch of its own (none when the batch is not laid out by rows)."""
    rows, singles, rest = batch_rows(batch), [], batch
    for _ in range(rows - 1):
        split = split_rows(rest, 1)
        if split is None:
            return []
        singles.append(split[0])
        rest = split[1]
    return singles + [rest] if rows > 1 else []


def _weights_differ(a: ItemRule, b: ItemRule, batches: Sequence[Mapping]) -> bool:
    """Whether rules `a` and `b` would weight the micro-batches (or the rows) of `batches` differently."""
    if (a.kind == "sum") != (b.kind == "sum"):
        return True
    units = list(batches) + [row for batch in batches for row in _single_rows(batch)]
    ca = torch.tensor([float(count_items(u, a)) for u in units], dtype=torch.float64)
    cb = torch.tensor([float(count_items(u, b)) for u in units], dtype=torch.float64)
    return not torch.allclose(ca / ca.sum().clamp_min(1), cb / cb.sum().clamp_min(1), rtol=1e-9, atol=1e-12)


def probe_loss_normalization(
    loss_of: Callable[[Mapping], float],
    batches: Sequence[Mapping],
    ignore_indices: Sequence[int] = (),
    rtol: float = 2e-4,
    reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
    allow_join: bool = True,
    label_key: str | None = None,
) -> ProbeResult:
    """Measure which `ItemRule` the loss `loss_of(batch)` follows, from the micro-batches of one window.

    Args:
        loss_of: the loss of one batch as a float, deterministic (eval mode, no gradients).
        batches: the micro-batches of the first window (at least one).
        ignore_indices: label values other than -100 that the head ignores, tried as token rules.
        rtol: relative tolerance of the additivity checks (looser for half-precision models).
        reduce_max: element-wise max over data-parallel processes, so that every process decides alike.
        allow_join: join two one-row micro-batches for the row probe (off under data parallelism, where the
            processes must run the same number of forward passes).
        label_key: the batch key of the labels when it is not `labels` (the Trainer's `label_names`).

    Returns:
        `ProbeResult` with the rule, or `None` and the reason it could not be established.
    """
    rules = candidate_rules(batches[0], ignore_indices, label_key)
    errors = torch.full((len(rules),), -1.0, dtype=torch.float64)  # -1: not tested; else the largest error seen

    def record(i: int, error: float | None) -> None:
        if error is not None:
            errors[i] = max(float(errors[i]), error)

    # Under data parallelism every process must run the same forward passes: one try each.
    attempts = MAX_PROBE_BATCHES if reduce_max is None else 1
    row_done = position_done = False
    for batch in _row_probe_batches(batches, allow_join)[:attempts]:
        rows = batch_rows(batch)
        whole = loss_of(batch)
        for k in dict.fromkeys([rows // 2, 1, rows - 1][:attempts]):
            split = split_rows(batch, k)
            if split is None:
                break
            losses = [(loss_of(part), part) for part in split]
            if _finite(whole, *(loss for loss, _ in losses)):
                for i, rule in enumerate(rules):
                    record(i, _error(rule, whole, losses))
                row_done = _tells_apart(rules, [part for _, part in losses])
                break
        if row_done:
            break

    token_rules = [i for i, rule in enumerate(rules) if rule.kind == "token"]
    for batch in batches[:attempts] if token_rules else ():
        labels = label_tensor(batch, label_key)
        if labels is None or labels[0].numel() < 2:
            break
        whole = loss_of(batch)
        for ignore in dict.fromkeys(rules[i].ignore_index for i in token_rules):
            halves = [mask_positions(batch, even, ignore, label_key) for even in (True, False)]
            try:
                losses = [(loss_of(half), half) for half in halves]
            except (RuntimeError, ValueError, IndexError):  # an ignore value the head does not accept as a label
                continue
            if _finite(whole, *(loss for loss, _ in losses)):
                position_done = position_done or _tells_apart([rules[i] for i in token_rules], halves)
                for i in token_rules:
                    if rules[i].ignore_index == ignore:
                        record(i, _error(rules[i], whole, losses))
        if position_done:
            break

    shifted = dataclasses.replace(SHIFTED_TOKEN, label_key=label_key)
    shift = rules.index(shifted) if shifted in rules else None
    if shift is not None:
        # Exact test: does the label at position 0 take part in the loss? A shifted loss never reads it.
        for batch in batches[:attempts]:
            labels = label_tensor(batch, label_key)
            if not bool(labels[:, 0].ne(IGNORE_INDEX).any()):
                continue
            whole = loss_of(batch)
            first = torch.full_like(labels[:, :1], IGNORE_INDEX)
            try:
                masked = loss_of({**batch, label_key or "labels": torch.cat([first, labels[:, 1:]], 1)})
            except (RuntimeError, ValueError, IndexError):  # the head does not accept -100 as a label
                break
            if _finite(whole, masked):
                change = abs(whole - masked) / max(abs(whole), 1e-12)
                unshifted = rules.index(dataclasses.replace(TOKEN, label_key=label_key))
                record(shift, 0.0 if change <= 1e-7 else math.inf)
                record(unshifted, math.inf if change <= 1e-7 else 0.0)
            break

    if reduce_max is not None:
        errors = reduce_max(errors)
    tested = [i for i in range(len(rules)) if errors[i] >= 0]
    accepted = sorted((i for i in tested if errors[i] <= rtol), key=lambda i: (float(errors[i]), i))
    if not accepted:
        if not tested:
            why = "its micro-batches cannot be split into parts that each hold an item"
            return ProbeResult(None, f"the first window cannot measure it: {why}", conclusive=False)
        return ProbeResult(None, "no normalisation (token, shifted_token, sample, element, sum) fits the measurements")
    chosen = accepted[0]
    # A rival that would weight the window differently must fit the numbers clearly worse than the chosen rule.
    rivals = [
        i
        for i in accepted[1:]
        if errors[i] < DECISIVE * max(float(errors[chosen]), 1e-9)
        and _weights_differ(rules[chosen], rules[i], batches)
    ]
    conflict = torch.tensor([float(bool(rivals))], dtype=torch.float64)
    if reduce_max is not None:
        conflict = reduce_max(conflict)
    if conflict.item() > 0:
        names = ", ".join(rules[i].name for i in [chosen] + rivals)
        return ProbeResult(None, f"the first window cannot tell {names} apart", conclusive=False)
    labels = label_tensor(batches[0], label_key)
    per = "label (one a row)" if rules[chosen].kind == "token" and labels is not None and labels.dim() == 1 else None
    return ProbeResult(rules[chosen], f"per {per or rules[chosen].name}, measured on the first window")
